from .pseudo_labels import LoadPseudoLabeld, PseudoLabelHandler
from .role_swap import RoleSwapHandler
