from .epoch_seed import EpochSeedHandler
from .epoch_weights import EpochWeightsSaver
from .pseudo_labels import PseudoLabelHandler
from .role_swap import RoleSwapHandler
