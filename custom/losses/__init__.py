from .dice import soft_dice_loss
from .distillation import DistillationLoss
from .mil import BAG_POOLINGS, BagMILLoss, ConstantMaskDiceLoss, MILPoolingLoss, bag_pool, gm_pool, pool_tile_scores
from .mixed import MixedSupervisionLoss
from .supervised import MaskSupervisedLoss
from .weighted_ce import WeightedCELoss
