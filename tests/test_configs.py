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
    ("train.json", "cpu.json"),
    ("train.json", "supervised.json"),
    ("train.json", "cpu.json", "slides.json"),
    ("train.json", "evaluate.json"),
    ("train.json", "multi_gpu_train.json"),
    ("inference.json",),
    ("inference.json", "cpu.json"),
    ("inference.json", "inference_ts.json"),
    ("inference.json", "evaluate_slides.json"),
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
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "cpu.json")], meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), workflow_type="train",
        dataset_dir=str(data), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "out"),
    )
    workflow.initialize()
    assert workflow.check_properties() == []


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
