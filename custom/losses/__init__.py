from .dice import soft_dice_loss
from .distillation import DistillationLoss
from .mil import ConstantMaskDiceLoss, MILPoolingLoss, gm_pool
from .supervised import MaskSupervisedLoss
from .weighted_ce import WeightedCELoss
