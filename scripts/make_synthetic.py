"""Generate the synthetic H&E-like data set (slides, masks, ASAP XML, slides.csv, 256x256 crops).

    python scripts/make_synthetic.py --out data/synthetic                      # the embedded default data
    python scripts/make_synthetic.py --out /tmp/big --slides 2 --size 20000 --patches_per_slide 0

Every option left out takes its default from ``custom.data.synthetic.SyntheticSpec``.
"""

from __future__ import annotations

import dataclasses
import json

import fire

from custom.data.synthetic import SyntheticSpec, generate_dataset
from custom.errors import report_input_errors


def main(
    out: str,
    slides: int | None = None,
    size: int | None = None,
    seed: int | None = None,
    mpp: float | None = None,
    patches_per_slide: int | None = None,
    test_fraction: float | None = None,
    workers: int = 2,
) -> None:
    """Write the data set to OUT (which must not exist or be empty) and print its summary as JSON."""
    overrides = {"n_slides": slides, "size": size, "seed": seed, "mpp": mpp}
    overrides |= {"patches_per_slide": patches_per_slide, "test_fraction": test_fraction}
    spec = dataclasses.replace(SyntheticSpec(), **{k: v for k, v in overrides.items() if v is not None})
    print(json.dumps(generate_dataset(out, spec, workers=workers), indent=2))


if __name__ == "__main__":
    report_input_errors()
    fire.Fire(main)
