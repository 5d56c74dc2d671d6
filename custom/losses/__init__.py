from .dice import soft_dice_loss
from .mil import ConstantMaskDiceLoss, MILPoolingLoss, gm_pool
