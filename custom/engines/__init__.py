from .bag_trainer import BagMILTrainer
from .batch import PrepareImageMask, PrepareWeakStrong
from .distillation_trainer import DistillationEvents, DistillationTrainer
from .evaluation import negatives_false_positive_curve, selection_evaluator, selection_key
from .stages import CHECKPOINT_POLICIES, RecordedCheckpointSaver, StageCheckpointSaver, run_stage, stage1_model_path
