from .dws_mil import DWSMIL
from .ensemble import MeanEnsemble
from .mil_segmenter import MILSegmenter
from .sa_mil import SAMIL, SpatialSelfAttention
from .vgg import load_vgg16_bn_trunk, vgg16_bn_trunk

__all__ = [
    "DWSMIL", "MeanEnsemble", "SAMIL", "MILSegmenter", "SpatialSelfAttention", "load_vgg16_bn_trunk", "vgg16_bn_trunk",
]
