"""Every shipped combination of configs parses, every reference in it resolves, and the bundle properties hold."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser, ConfigWorkflow

from custom.data.synthetic import SyntheticSpec, generate_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"

COMBINATIONS = [
    ("train.json",),
    ("train.json", "cpu_train.json"),
    ("train.json", "supervised.json"),
    ("train.json", "cpu_train.json", "supervised.json"),
    ("train.json", "cpu_train.json", "slides.json"),
    ("train.json", "slides.json", "cpu_train.json"),
    ("train.json", "cpu_train.json", "slides.json", "slide_mil.json"),
    ("train.json", "cpu_train.json", "supervised.json", "slides.json"),
    ("train.json", "slides.json", "slide_mil.json", "multi_gpu_train.json"),
    ("train.json", "evaluate.json"),
    ("train.json", "cpu_train.json", "evaluate.json"),
    ("train.json", "multi_gpu_train.json"),
    ("train.json", "cpu_train.json", "multi_gpu_train.json"),
    ("inference.json",),
    ("inference.json", "cpu_inference.json"),
    ("inference.json", "inference_ts.json"),
    ("inference.json", "evaluate_slides.json"),
    ("inference.json", "cpu_inference.json", "evaluate_slides.json"),
    ("inference.json", "multi_gpu_inference.json"),
]


def _parser(files: tuple[str, ...]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in files])
    parser.parse()
    return parser


@pytest.mark.parametrize("files", COMBINATIONS, ids=lambda files: "+".join(Path(f).stem for f in files))
def test_every_reference_resolves(files):
    """Resolving the whole config without evaluating expressions fails on any reference to a missing id."""
    parser = _parser(files)
    parser.get_parsed_content("", instantiate=False, eval_expr=False)  # raises on an unknown @reference


def test_training_workflow_properties(tmp_path):
    """MONAI's required train properties (bundle_root, device, dataset_dir, trainer, ...) are all present."""
    data = tmp_path / "data"
    generate_dataset(data, SyntheticSpec(n_slides=4, size=1024, patches_per_slide=8, patch_size=64, test_fraction=0.5))
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "cpu_train.json")],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), workflow_type="train",
        dataset_dir=str(data), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "out"),
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_every_config_file_is_in_a_combination():
    """A config file added to bundle/configs is resolved above, in at least one combination."""
    shipped = {p.name for p in CONFIGS.glob("*.json")} - {"metadata.json"}
    assert shipped == {name for files in COMBINATIONS for name in files}


def test_cpu_overrides_are_split_by_workflow():
    """cpu_train.json and cpu_inference.json agree on the model's contract (network width, resolution); neither
    sets a knob of the other workflow, and no later overlay resets what they set."""
    train, infer = (ConfigParser.load_config_file(CONFIGS / name) for name in ("cpu_train.json", "cpu_inference.json"))
    assert train["network_width"] == infer["network_width"] and train["mpp"] == infer["mpp"]
    for overlay, base in ((train, "train.json"), (infer, "inference.json")):
        knobs = set(ConfigParser.load_config_file(CONFIGS / base))
        assert {k for k in overlay if not k.startswith("_")} <= knobs, f"an override of a knob {base} does not define"
    inference = _parser(("inference.json", "cpu_inference.json"))
    assert (inference.get_parsed_content("batch_size")
            == ConfigParser.load_config_file(CONFIGS / "inference.json")["batch_size"])
    for files in (("train.json", "cpu_train.json", "slides.json"), ("train.json", "slides.json", "cpu_train.json")):
        assert _parser(files).get_parsed_content("tile_dataset#mpp", instantiate=False) == train["mpp"]


def test_multi_gpu_wraps_the_report_step():
    """multi_gpu_train.json replaces the last step of train.json's run, which must be the report."""
    run = ConfigParser.load_config_file(CONFIGS / "train.json")["run"]
    assert run[-1] == "$@report.write()"
    assert f"run#{len(run) - 1}" in ConfigParser.load_config_file(CONFIGS / "multi_gpu_train.json")


def test_a_misspelt_reference_is_caught():
    """The check above can fail: a config whose reference points nowhere."""
    parser = ConfigParser({"a": 1, "b": "@c"})
    parser.parse()
    with pytest.raises(ValueError, match="the referring item `@c` is not defined"):
        parser.get_parsed_content("", instantiate=False, eval_expr=False)


def test_inference_workflow_properties(tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"), meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), workflow_type="infer", output_dir=str(tmp_path / "out"),
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_slide_mil_replaces_the_data_check_step():
    """slide_mil.json replaces train.json's initialize step 3, which must be the pre-training data check (after the
    one-line error reporting and the seed)."""
    initialize = ConfigParser.load_config_file(CONFIGS / "train.json")["initialize"]
    assert initialize[0] == "$custom.errors.report_input_errors()"
    assert initialize[3].startswith("$custom.data.check_training_data(")
    replaced = ConfigParser.load_config_file(CONFIGS / "slide_mil.json")["initialize#3"]
    assert replaced.startswith("$custom.data.check_training_data(") and "unit='slide'" in replaced
