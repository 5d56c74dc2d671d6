# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The MONAI Label tasks, datastore and request checks of the app (``main.py`` imports them)."""

from .corrections import corrections
from .datastore import StudiesDatastore
from .entropy import EntropyStrategy
from .guard import install as install_guard
from .request_checks import MAX_REGION_PIXELS, MAX_TILES, Region, StudiesFile, check_name, check_region, studies_image
from .tumour_infer import TumourSegmentation
from .tumour_train import DEFAULT_TRAIN_CONFIGS, TumourTraining
