"""scripts/bench_train.py on a tiny setting: its three rows (bundle trainer against a plain loop) and its last line."""

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_prints_the_three_rows_and_the_ratio(capsys):
    _bench_module().main(n_images=8, size=64, warmup=0, epochs=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert re.fullmatch(r"train_vs_plain=\d+\.\d\d", lines[-1])
    ratio = float(lines[-1].split("=")[1])
    header = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    rows = [line.split("  ") for line in lines[header + 1:-1]]
    names = [re.split(r"\s{2,}", line.strip())[0] for line in lines[header + 1:-1]]
    assert names == ["stage 1", "stage 2 cached", "stage 2 teacher"]
    ratios = [float(line.split()[-1]) for line in lines[header + 1:-1]]
    assert all(r > 0 for r in ratios) and min(ratios) == ratio
    assert len(rows) == 3


def test_overrides_keep_the_cpu_defaults_and_amp_only_on_a_gpu():
    overrides_of = _bench_module().overrides_of
    assert overrides_of() == {"device": "$torch.device('cpu')", "amp": False}
    assert overrides_of("cpu", amp=True)["amp"] is False
    gpu = overrides_of("cuda", amp=True, width=1.0, image_size=256, num_workers=2)
    assert gpu == {"device": "$torch.device('cuda')", "amp": True, "network_width": 1.0, "image_size": 256,
                   "num_workers": 2}
