from .annotations import EXCLUDED, TUMOUR, rasterize_annotations, read_asap_xml
from .checks import check_training_data
from .datalist import EBHI_GROUP_PATTERN, load_slide_datalist, patch_folder_datalist, split_train_val
from .datasets import (
    LoadPatchd,
    LoadTiled,
    PatchFolderDataset,
    SlideBagDataset,
    SlideTileDataset,
    patch_transforms,
    readable_slides,
)
from .images import read_mask, read_rgb
from .samplers import EpochSampler, epoch_sampler, strong_weights
from .strong_labels import STRONG_KEY, read_strong_datalist, with_strong_labels
from .synthetic import SyntheticSpec, ensure_sample_data, generate_dataset
