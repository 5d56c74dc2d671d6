from .distillation_trainer import DistillationEvents, DistillationTrainer
from .batch import PrepareImageMask
from .stages import load_weights, run_stage
