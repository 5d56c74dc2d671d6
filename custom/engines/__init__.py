from .bag_trainer import BagMILTrainer
from .batch import PrepareImageMask, PrepareWeakStrong
from .distillation_trainer import DistillationEvents, DistillationTrainer
from .evaluation import negatives_false_positive_curve, selection_evaluator, selection_key
from .stages import RecordedCheckpointSaver, StageCheckpointSaver, run_stage
