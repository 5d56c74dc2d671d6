from .outputs import write_image_outputs, write_slide_outputs
from .plain_image import PlainImage
from .runner import SlideInferenceError, SlideInferenceRunner, inference_items
from .stitch import StripMerger, importance_map
from .wsi import SlidePrediction, TileDataset, WholeSlideInferer
