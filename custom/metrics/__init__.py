from .baselines import all_background_maps, evaluate_baselines, oracle_label_maps
from .segmentation import METRIC_KEYS, MILSegmentationHandler, MILSegmentationMetric, evaluate_maps
from .selection import MASK_FREE_METRICS, SELECTION_METRICS, SelectionHandler, SelectionMetric, summarise_selection
from .slide import SlideEvaluator, all_tissue_floor, evaluate_slide, truth_reader
