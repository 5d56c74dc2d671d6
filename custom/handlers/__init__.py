from .epoch_seed import EpochSeedHandler
from .epoch_weights import SNAPSHOT_PREFIX, EpochWeightsSaver, epoch_weight_files
from .history import TrainingHistory
from .pseudo_labels import PseudoLabelHandler
from .role_swap import RoleSwapHandler
