"""scripts/bench_infer.py's scaling mode on a tiny slide: its rows parse and the tissue tiles grow with the factor."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _bench_module(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # bench_infer imports bench_train's memory window, as when run
    spec = importlib.util.spec_from_file_location("bench_infer", SCRIPTS / "bench_infer.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_infer", module)  # the slide's rendering workers unpickle from it
    spec.loader.exec_module(module)
    return module


def test_scaling_rows_grow_with_the_tissue(tmp_path, monkeypatch, capsys):
    bench = _bench_module(monkeypatch).bench
    bench(scaling=True, sizes="1,4", size=512, level=0, tile=128, overlap=16, warmup=False, repeats=2,
          cache_dir=str(tmp_path), json_out=str(tmp_path / "scaling.json"))
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("tissue "))
    assert lines[header].split("  ")[0] == "tissue"
    rows = [line.split() for line in lines[header + 1:header + 3]]
    assert [row[0] for row in rows] == ["1x", "4x"]
    slide_px, tiles = [int(row[1]) for row in rows], [int(row[3]) for row in rows]
    assert slide_px == [512, 1024]
    assert 0 < tiles[0] and 3 * tiles[0] <= tiles[1] <= 5 * tiles[0]  # a 2x2 mosaic: about 4x the tissue tiles
    assert all(float(cell) > 0 for row in rows for cell in row[4:8] + row[9:])
    low, high = (float(m) for m in rows[0][8].split("-"))  # the range of the two runs' peaks holds their median
    assert low <= float(rows[0][7]) <= high
    assert rows[0][-3:] == ["1.00", "1.00", "1.00"]
    summary = re.fullmatch(r"scaling: time/tile 4x vs 1x = (\d+\.\d\d), peak memory 4x vs 1x = (\d+\.\d\d)", lines[-1])
    assert summary and float(summary[1]) > 0 and float(summary[2]) > 0
    record = json.loads((tmp_path / "scaling.json").read_text())
    assert [row["n_tiles"] for row in record["rows"]] == tiles
    assert all(row["peak_rss_mb"] >= row["start_rss_mb"] > 0 for row in record["rows"])  # one window per row
    assert all(len(row["peak_rss_runs_mb"]) == len(row["wall_runs_s"]) == 2 for row in record["rows"])
    assert all(row["timings"]["wall"] in row["wall_runs_s"] for row in record["rows"])  # a measured run, not a mix


def test_sizes_are_square_area_factors(monkeypatch):
    factors = _bench_module(monkeypatch)._factors
    assert factors((1, 4, 16)) == [1, 4, 16] and factors("1,9") == [1, 9] and factors(4) == [4]
    with pytest.raises(SystemExit, match="perfect squares"):
        factors("1,2")
