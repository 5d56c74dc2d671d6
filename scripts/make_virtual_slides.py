"""Compose virtual slides of real tissue from patch folders (pyramidal JPEG BigTIFF, mask TIFF, ASAP XML, slides.csv).

    python scripts/make_virtual_slides.py --out data/vslides --tissue ../shared/data/ebhi-seg \
        --benign ../shared/data/ebhi-benign                                # 48 train + 20 test slides, 12-16 tiles
    python scripts/make_virtual_slides.py --out /tmp/big --tissue ../shared/data/ebhi-seg --n_train_slides 1 \
        --n_test_slides 0 --positive_fraction 1 --grid_min 90 --grid_max 90   # one 20,160 px slide

TISSUE holds ``{train,test}/{pos,neg,gt}`` (tumour tiles with masks, normal tiles), BENIGN (optional)
``{train,test}/neg`` (benign lesions). Any other ``--knob value`` sets that field of
``custom.data.virtual_slides.VirtualSlideSpec`` (n_train_slides, n_test_slides, grid_min, grid_max, tissue_fraction,
positive_fraction, tumour_fraction, clusters, benign_fraction, slides_per_patient, mpp, jpeg_quality, tiff_tile,
glass_rgb, glass_noise, group_pattern, seed); ranges as ``--tumour_fraction "[0.03,0.3]"``. An existing complete
OUT made with the same knobs and sources is reused. Prints a progress line per slide and the summary as JSON; bad
input exits 1 with a message naming the folder, before any slide is written.
"""

from __future__ import annotations

import json
import sys

import fire

from custom.data.virtual_slides import generate_virtual_slides, spec_from_knobs
from custom.errors import report_input_errors


def _say(line: str) -> None:
    print(line, flush=True)


def main(out: str, tissue: str, benign: str | None = None, workers: int = 2, **knobs) -> None:
    """Write the virtual slides to OUT (which must not exist, be empty, or hold the same complete set)."""
    try:
        spec = spec_from_knobs(**knobs)
        summary = generate_virtual_slides(out, tissue, benign, spec, workers=workers, progress=_say)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
    brief = {key: summary[key] for key in ("version", "spec", "sources", "splits", "seconds") if key in summary}
    print(json.dumps(brief | {"reused": summary.get("reused", False)}, indent=2))


if __name__ == "__main__":
    report_input_errors()
    fire.Fire(main)
