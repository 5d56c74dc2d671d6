# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The MONAI Label tasks and request checks of the app (``main.py`` imports them)."""

from .request_checks import MAX_REGION_PIXELS, MAX_TILES, Region, check_region, studies_image
from .tumour_infer import TumourSegmentation
