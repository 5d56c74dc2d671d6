from .epoch_seed import EpochSeedHandler
from .epoch_weights import CHECKPOINT_POLICIES, SNAPSHOT_PREFIX, EpochWeightsSaver, epoch_weight_files, stage1_model_path
from .pseudo_labels import PseudoLabelHandler
from .role_swap import RoleSwapHandler
