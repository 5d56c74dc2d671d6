# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Slide-bag MIL training throughput and peak memory, against tile training doing the same work in the same run.

Three rows, each one training step after another over the same number of tiles per step (``bags x tiles_per_bag``),
the same DWS-MIL network, Adam and tiles of ``tile_size`` held in memory (reading is ``bench_read.py``'s subject):

- ``tile training``: MONAI's ``SupervisedTrainer`` with ``MILPoolingLoss`` on batches of tiles, each with its own
  label (what ``slides.json`` does alone, tile-label mode);
- ``bag, one pass``: ``custom.engines.BagMILTrainer`` with ``BagMILLoss``, every tile of the step in one forward pass
  (``tile_batch`` = tiles per step);
- ``bag, two passes``: the same with ``tile_batch`` a quarter of that: bounded memory for large bags, at the cost of
  one extra forward pass per step.

Each row runs in its own child process, so that its peak memory (resident set on CPU, ``max_memory_allocated`` on a
GPU) is its own; the first ``warmup`` steps are not timed. The last lines estimate one epoch of Camelyon16's 270
training slides at ``bags_per_slide`` bags of ``tiles_per_bag`` tiles each, from the measured bag rate.

    python scripts/bench_bags.py                                   # CPU: 2 bags x 16 tiles of 128 px, width 0.25
    python scripts/bench_bags.py --device cuda --width 1.0 --tile_size 256 --tiles_per_bag 64 --amp True

``--json_out FILE`` also writes the setting, the rows and the epoch estimates as JSON.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import fire
import torch
from bench_train import peak_since, reset_peak  # the memory window of the training benchmarks, one owner

from custom.errors import report_input_errors
from custom.tables import Column, format_table

CAMELYON16_TRAIN_SLIDES = 270
COLUMNS = [
    Column("row", align="<"),
    Column("tiles/step", align=">"),
    Column("tile_batch", align=">"),
    Column("tiles/s", float_format=".1f"),
    Column("vs tiles", float_format=".2f"),
    Column("peak MB", float_format=".0f"),
    Column("mem vs tiles", float_format=".2f"),
]


def _row(kind: str, settings: dict, queue: mp.Queue) -> None:
    """Child process: build one row's trainer, time its steps, put (tiles/s, peak MB above the start) on the queue.
    The training modules are imported here, in the children only, so the parent starts quickly."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    from custom.engines import BagMILTrainer
    from custom.losses import BagMILLoss, MILPoolingLoss
    from custom.networks import DWSMIL

    torch.set_num_threads(settings["threads"])
    torch.manual_seed(0)
    device = torch.device(settings["device"])
    bags, k, size = settings["bags"], settings["tiles_per_bag"], settings["tile_size"]
    network = DWSMIL(width=settings["width"]).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    steps = settings["warmup"] + settings["steps"]
    if kind == "tiles":
        batch = {"image": torch.randn(bags * k, 3, size, size), "label": torch.randint(0, 2, (bags * k,)).float()}
        trainer_class, loss, extra = SupervisedTrainer, MILPoolingLoss(), {}
    else:
        labels = torch.tensor([float(i % 2) for i in range(bags)])
        batch = {"image": torch.randn(bags, k, 3, size, size), "label": labels}
        tile_batch = bags * k if kind == "one pass" else max(1, bags * k // 4)
        trainer_class, loss, extra = BagMILTrainer, BagMILLoss(), {"tile_batch": tile_batch}
    trainer = trainer_class(
        device=device, max_epochs=1, train_data_loader=[batch] * steps, network=network, optimizer=optimizer,
        loss_function=loss, amp=settings["amp"], decollate=False, **extra,
    )
    times: list[float] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: times.append(time.perf_counter()))
    start = reset_peak(device) if settings["warmup"] == 0 else None

    def start_window(engine) -> None:
        nonlocal start
        if engine.state.iteration == settings["warmup"]:
            start = reset_peak(device)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, start_window)
    trainer.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    timed = end - times[settings["warmup"]]
    queue.put((bags * k * settings["steps"] / timed, peak_since(device, start)))


def main(
    device: str = "cpu",
    width: float = 0.25,
    tile_size: int = 128,
    bags: int = 2,
    tiles_per_bag: int = 16,
    steps: int = 6,
    warmup: int = 2,
    threads: int = 2,
    amp: bool = False,
    bags_per_slide: int = 4,
    json_out: str | None = None,
) -> None:
    """Print the three rows, their ratios to tile training and the Camelyon16 epoch estimate (and write them to
    ``json_out`` when given)."""
    settings = {"device": device, "width": width, "tile_size": tile_size, "bags": bags, "tiles_per_bag": tiles_per_bag,
                "steps": steps, "warmup": warmup, "threads": threads, "amp": amp and device.startswith("cuda")}
    context = mp.get_context("spawn")
    results = {}
    for kind in ("tiles", "one pass", "two passes"):
        queue = context.Queue()
        child = context.Process(target=_row, args=(kind, settings, queue))
        child.start()
        results[kind] = queue.get()
        child.join()
        if child.exitcode:
            raise SystemExit(f"row {kind!r} failed (exit code {child.exitcode})")
    per_step = bags * tiles_per_bag
    tile_rate, tile_peak = results["tiles"]
    rows = []
    for kind, label in (("tiles", "tile training"), ("one pass", "bag, one pass"), ("two passes", "bag, two passes")):
        rate, peak = results[kind]
        tile_batch = per_step if kind != "two passes" else max(1, per_step // 4)
        rows.append([label, per_step, tile_batch, rate, rate / tile_rate, peak, peak / tile_peak if tile_peak else 0])
    print(f"DWS-MIL width {width}, tiles {tile_size} px, {bags} bags x {tiles_per_bag} tiles per step, {steps} timed "
          f"steps after {warmup}, {threads} torch threads, device {device}{', AMP' if settings['amp'] else ''}")
    print(format_table(COLUMNS, rows, sep="  "))
    tiles_per_epoch = CAMELYON16_TRAIN_SLIDES * bags_per_slide * tiles_per_bag
    epoch_min = {}
    for label, kind in (("one pass", "one pass"), ("two passes", "two passes")):
        seconds = tiles_per_epoch / results[kind][0]
        epoch_min[kind] = seconds / 60
        print(f"Camelyon16 ({CAMELYON16_TRAIN_SLIDES} slides x {bags_per_slide} bags x {tiles_per_bag} tiles = "
              f"{tiles_per_epoch} tiles per epoch), bag {label}: {seconds / 60:.1f} min per epoch on this device")
    if json_out:
        record = dict(settings, bags_per_slide=bags_per_slide, tiles_per_epoch=tiles_per_epoch,
                      bag_vs_tiles=results["one pass"][0] / tile_rate,
                      camelyon16_epoch_min={"one_pass": epoch_min["one pass"], "two_passes": epoch_min["two passes"]},
                      rows=[dict(zip(("row", "tiles_per_step", "tile_batch", "tiles_s", "vs_tiles", "peak_mb",
                                      "mem_vs_tiles"), row)) for row in rows])
        Path(json_out).write_text(json.dumps(record, indent=1))
    print(f"bag_vs_tiles={results['one pass'][0] / tile_rate:.2f}")


if __name__ == "__main__":
    report_input_errors()
    fire.Fire(main)
