"""bundle/docs/README.md documents every knob of the shipped workflows (a knob named once, in a table row)."""

import re
from pathlib import Path

from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
DOC = ROOT / "bundle" / "docs" / "README.md"


def knobs(config: str) -> set[str]:
    """Top-level entries of a config whose value is plain data (not a component, a list or an expression)."""
    data = ConfigParser.load_config_file(CONFIGS / config)
    return {key for key, value in data.items() if not key.startswith("_") and not isinstance(value, (dict, list))
            and not (isinstance(value, str) and value[:1] in "$@%")}


def documented() -> set[str]:
    """First-column names of every table whose header starts with ``| knob`` or ``| name``, and the names that open
    a list item (``- `level` / `mpp`: ...``, the inference knobs)."""
    names, in_table = set(), False
    for line in DOC.read_text().splitlines():
        item = re.match(r"- ((?:`[A-Za-z0-9_#]+`(?: / )?)+):", line)
        if item:
            names.update(re.findall(r"`([A-Za-z0-9_#]+)`", item[1]))
        if re.match(r"\| (knob|name) \|", line):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table:
            names.update(re.findall(r"`([A-Za-z0-9_#]+)`", line.split("|")[1]))
    return names


def test_every_training_and_inference_knob_has_a_row():
    rows = documented()
    for config in ("train.json", "inference.json", "evaluate.json", "evaluate_slides.json", "slides.json"):
        missing = sorted(knobs(config) - rows)
        assert not missing, f"{config}: knobs without a row in bundle/docs/README.md: {missing}"


def test_the_reader_finds_rows_and_the_new_knobs():
    rows = documented()
    assert {"strong_fraction", "strong_datalist", "strong_weight", "init_path", "lambda_mil"} <= rows
    assert {"level", "mpp", "overwrite"} <= rows  # inference knobs, a list in its section
    assert "no_such_knob" not in rows
