from .dice import soft_dice_loss
from .distillation import DistillationLoss
from .mil import ConstantMaskDiceLoss, MILPoolingLoss, gm_pool
from .weighted_ce import WeightedCELoss
from .supervised import MaskSupervisedLoss
