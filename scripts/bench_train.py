# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Training throughput: the bundle's trainers, built from train.json + cpu_train.json, against plain PyTorch loops.

Three rows, each the bundle's trainer and a plain loop doing the same work in the same process, on the same images:

- ``stage 1``: the config's ``train#trainer`` (MONAI ``SupervisedTrainer``, DWS-MIL, ``MILPoolingLoss``, the
  cached ``PatchFolderDataset`` with per-sample normalisation, its handlers) against a loop over the same network
  class, loss, optimizer and batch with the images in memory as one tensor, normalised per batch;
- ``stage 2 cached``: the config's ``distill#trainer`` (``custom.engines.DistillationTrainer``, ``DistillationLoss``,
  ``LoadPseudoLabeld`` serving the pseudo-labels its handler wrote, ``RandFlipRotate90Batchd`` on each batch) against a
  loop with the teacher's maps in memory and the same flips and quarter turns drawn per image on the batch;
- ``stage 2 teacher``: the same with ``cache_pseudo_labels: false`` (a no-grad teacher forward every batch), against
  a loop that runs the teacher the same way.

The images are random RGB PNG patches written to a temporary folder in the layout ``patch_folder_datalist`` reads
(nothing is downloaded). Validation is pushed past the last epoch (``val_interval``) and the role swap is off, so the
timed window is training only: from the epoch's start to its last iteration's end, which includes every per-iteration
handler the config attaches (progress bar, TensorBoard). The two sides alternate epoch by epoch (one plain epoch runs
when each bundle epoch completes, outside the bundle's timed window), so a change in the machine's speed during a row
reaches both alike. The first ``warmup`` pairs are not timed; the rates are medians over the ``epochs`` timed ones, and
the ratio is the median of the pairs' ratios. Both sides use the process's torch threads (``--threads``).

``--device cuda --amp True`` runs the same trainers and loops on a GPU (the configs' CUDA autocast + GradScaler, and the
same in the plain loops), with the batches copied to the device every step on both sides; ``--width``,
``--image_size``, ``--batch_size`` and ``--num_workers`` override the configs' ``network_width``, ``image_size``,
``batch_size`` and ``num_workers`` (``--width 1.0 --image_size 256`` is ``train.json``'s full-size network). Each
row also records the peak memory of the bundle trainer's run above its start (``max_memory_allocated`` on a GPU, the
resident set on a CPU, as ``bench_bags.py``), printed on a GPU and written with ``--json_out``.

    python scripts/bench_train.py                      # 96 patches (80 trained on), 1 warm-up + 5 timed epochs per row
    python scripts/bench_train.py --n_images 256 --epochs 5 --threads 2
    python scripts/bench_train.py --pseudo_in_memory False   # LoadPseudoLabeld decoding every file every time
    python scripts/bench_train.py --device cuda --amp True --width 1.0 --image_size 256 --size 256 --num_workers 2

The last line is ``train_vs_plain=<ratio>``: the lowest of the rows' bundle / plain images-per-second ratios.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import fire
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.utils import set_determinism
from PIL import Image

from custom.data.images import read_rgb
from custom.errors import report_input_errors
from custom.losses import DistillationLoss, MILPoolingLoss
from custom.networks import DWSMIL
from custom.tables import Column, format_table
from custom.transforms import IMAGENET_MEAN, IMAGENET_STD

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
CONFIG_FILES = ("train.json", "cpu_train.json")
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
COLUMNS = [
    Column("stage", align="<"),
    Column("images", align=">"),
    Column("bundle img/s", float_format=".1f"),
    Column("plain img/s", float_format=".1f"),
    Column("ratio", float_format=".2f"),
]


def write_patches(root: Path, n_images: int, size: int, seed: int = 0) -> Path:
    """``root/train/{pos,neg}/<p|n>case<k>-<i>.png`` random RGB patches, half positive, two per case (the group
    the config's validation split keeps together)."""
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        kind = "pos" if i % 2 else "neg"
        folder = root / "train" / kind
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{kind[0]}case{i // 4}-{i:04d}.png")
    return root


def bundle_config(data_dir: Path, work_dir: Path, epochs: int, cache: bool = True, seed: int = 111,
                  pseudo_in_memory: bool = True, overrides: dict | None = None) -> ConfigParser:
    """train.json + cpu_train.json over ``data_dir``, outputs under ``work_dir``, no validation and no role swap;
    ``pseudo_in_memory`` False makes ``LoadPseudoLabeld`` decode its file on every sample (the behaviour before
    it kept decoded maps), to measure what keeping them saves. ``overrides`` (config keys, e.g. ``device``,
    ``amp``, ``network_width``) are applied last."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in CONFIG_FILES])
    parser.update(
        {
            "bundle_root": str(work_dir),
            "dataset_dir": str(data_dir),
            "device": "$torch.device('cpu')",
            "amp": False,
            "seed": seed,
            "stage1_epochs": epochs,
            "stage2_epochs": epochs,
            "val_interval": epochs + 1,
            "swap_policy": "off",
            "keep_epoch_weights": False,
            "cache_pseudo_labels": cache,
            **(overrides or {}),
        }
    )
    for transform in parser["distill"]["transforms"]:
        if isinstance(transform, dict) and transform.get("_target_") == "custom.transforms.LoadPseudoLabeld":
            transform["keep_in_memory"] = pseudo_in_memory
    set_determinism(seed=seed)
    return parser


def _rss_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (peak) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak(device: torch.device) -> float:
    """Start a peak-memory window; return the memory in use now (MB): allocated on a GPU, resident on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current resident set
    except OSError:  # not writable here: the peak is then the process's since its start
        pass
    return _rss_mb("VmRSS")


def peak_since(device: torch.device, start: float) -> float:
    """The peak memory (MB) since ``reset_peak`` returned ``start``, above ``start``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20 - start
    return _rss_mb("VmHWM") - start


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously; a CPU has nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(engine: Engine, plain_epoch: Callable[[], float], warmup: int,
                device: torch.device = torch.device("cpu")) -> tuple[float, float, float, float]:
    """Run ``engine`` with one ``plain_epoch`` after each of its epochs; return the median seconds of the timed
    bundle and plain epochs, the median of their per-epoch ratios (plain seconds / bundle seconds) and the bundle's
    peak memory (MB) over its first epoch.

    A bundle epoch is timed from its start to its last iteration's end (after every handler attached before this one
    on those events; on a GPU, once the iteration's queued work has finished); the plain epoch runs at
    ``EPOCH_COMPLETED``, after that window and before the next one opens."""
    starts: list[float] = []
    ends: dict[int, float] = {}
    plain: list[float] = []
    peak: list[float] = []

    def iteration_done(e: Engine) -> None:
        _sync(device)
        ends[e.state.epoch] = time.perf_counter()

    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: starts.append(time.perf_counter()))
    engine.add_event_handler(Events.ITERATION_COMPLETED, iteration_done)
    # attached in this order: the first epoch's peak is read before the first plain epoch runs
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: peak.append(peak_since(device, baseline)))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: plain.append(plain_epoch()))
    baseline = reset_peak(device)
    engine.run()
    bundle = [ends[epoch + 1] - start for epoch, start in enumerate(starts)][warmup:]
    plain = plain[warmup:]
    ratios = [p / b for b, p in zip(bundle, plain)]
    return statistics.median(bundle), statistics.median(plain), statistics.median(ratios), peak[0]


def load_images(items: list[dict], image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images as one (N, 3, H, W) float tensor in [0, 1] and their (N,) float labels; patches of another
    size than ``image_size`` are resized to it (bilinear, anti-aliased, as the config's ``resize_mode: resize``), so
    both sides train on images of the same size."""
    images = np.stack([read_rgb(item["image"]) for item in items])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    if image_size is not None and tuple(pixels.shape[-2:]) != (image_size, image_size):
        pixels = torch.nn.functional.interpolate(pixels, (image_size, image_size), mode="bilinear", antialias=True)
    return pixels, torch.tensor([float(item["label"]) for item in items])


def augment(image: torch.Tensor, pseudo: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distillation augmentation drawn per image on a batch, image and pseudo-label together: a row flip
    (p 0.5), then (p 0.5) a turn by k x 90 degrees, k from 1 to 3, the distribution of the config's
    ``RandFlipRotate90Batchd`` (and of ``RandFlipd(spatial_axis=0)`` + ``RandRotate90d`` per sample)."""
    n = image.shape[0]
    flip = torch.rand(n) < 0.5
    turns = torch.where(torch.rand(n) < 0.5, torch.randint(1, 4, (n,)), 0)
    image, pseudo = image.clone(), None if pseudo is None else pseudo.clone()
    for t in (image, pseudo):
        if t is None:
            continue
        t[flip] = t[flip].flip(-2)
        for k in (1, 2, 3):
            t[turns == k] = t[turns == k].rot90(k, (-2, -1))
    return image, pseudo


def plain_loop(step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None], images: torch.Tensor,
               labels: torch.Tensor, batch_size: int,
               device: torch.device = torch.device("cpu")) -> Callable[[], float]:
    """A function that runs one epoch of shuffled batches (index order, copied to ``device`` and normalised there
    per batch) through ``step`` and returns its seconds; on a GPU the epoch ends when its queued work has finished."""
    mean, std = MEAN.to(device), STD.to(device)

    def epoch() -> float:
        start = time.perf_counter()
        order = torch.randperm(images.shape[0])
        for batch in order.split(batch_size):
            image = images[batch].to(device, non_blocking=True)
            step(batch, (image - mean) / std, labels[batch].to(device, non_blocking=True))
        _sync(device)
        return time.perf_counter() - start

    return epoch


def config_device(config: ConfigParser) -> tuple[torch.device, bool]:
    """The config's device and whether AMP is on (CUDA autocast + GradScaler, as MONAI's trainers use it)."""
    device = torch.device(config.get_parsed_content("device"))
    return device, bool(config.get_parsed_content("amp")) and device.type == "cuda"


def plain_network(config: ConfigParser, source: torch.nn.Module) -> torch.nn.Module:
    """A fresh network of the config's class and width holding ``source``'s weights, on the config's device."""
    network = DWSMIL(width=config["network_width"])
    network.load_state_dict(source.state_dict())
    return network.to(config_device(config)[0])


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler) -> None:
    """``loss.backward()`` and the optimizer step, through ``scaler`` (a ``torch.amp.GradScaler``) when given."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def plain_optimizer(config: ConfigParser, network: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam with the config's learning rate and weight decay, as train.json builds it."""
    return torch.optim.Adam(network.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"])


def bench_stage1(data_dir: Path, work_dir: Path, warmup: int, epochs: int,
                 overrides: dict | None = None) -> tuple[int, float, float, float, float]:
    """(images per epoch, bundle img/s, plain img/s, ratio, bundle peak MB) of stage 1."""
    config = bundle_config(data_dir, work_dir / "stage1", warmup + epochs, overrides=overrides)
    device, amp = config_device(config)
    trainer = config.get_parsed_content("train#trainer")
    items = config.get_parsed_content("train#datalist")
    start_weights = plain_network(config, config.get_parsed_content("teacher"))
    images, labels = load_images(items, config["image_size"])
    network = plain_network(config, start_weights)
    optimizer = plain_optimizer(config, network)
    loss_function = MILPoolingLoss(r=4.0)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    network.train()

    def step(index: torch.Tensor, image: torch.Tensor, label: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=False)
        if scaler is None:
            loss_function(network(image), label).backward()
            optimizer.step()
            return
        with torch.autocast("cuda"):
            loss = loss_function(network(image), label)
        backward_step(loss, optimizer, scaler)

    bundle, plain, ratio, peak = interleaved(trainer, plain_loop(step, images, labels, config["batch_size"], device),
                                             warmup, device)
    return len(items), len(items) / bundle, len(items) / plain, ratio, peak


def bench_stage2(data_dir: Path, work_dir: Path, warmup: int, epochs: int, cache: bool,
                 pseudo_in_memory: bool = True,
                 overrides: dict | None = None) -> tuple[int, float, float, float, float]:
    """(images per epoch, bundle img/s, plain img/s, ratio, bundle peak MB) of stage 2, with the pseudo-label cache
    or a teacher forward."""
    folder = work_dir / f"stage2_{'cached' if cache else 'teacher'}"
    config = bundle_config(data_dir, folder, warmup + epochs, cache, pseudo_in_memory=pseudo_in_memory,
                           overrides=overrides)
    device, amp = config_device(config)
    trainer = config.get_parsed_content("distill#trainer")
    items = config.get_parsed_content("train#datalist")
    teacher = plain_network(config, config.get_parsed_content("teacher")).eval().requires_grad_(False)
    student = plain_network(config, config.get_parsed_content("student"))
    images, labels = load_images(items, config["image_size"])
    optimizer = plain_optimizer(config, student)
    loss_function = DistillationLoss(
        lambda_wce=config["lambda_wce"], use_wce=config["use_wce"], wce_threshold=config["wce_threshold"],
        target=config["distill_target"],
    )
    scaler = torch.amp.GradScaler("cuda") if amp else None
    pseudo = None
    if cache:  # the teacher's fused maps, computed once as the pseudo-label handler does, kept in memory
        mean, std = MEAN.to(device), STD.to(device)
        with torch.no_grad(), torch.autocast("cuda", enabled=amp):
            pseudo = torch.cat([teacher((images[i:i + 16].to(device) - mean) / std)[:, -1:].float()
                                for i in range(0, len(images), 16)])

    def step(index: torch.Tensor, image: torch.Tensor, label: torch.Tensor) -> None:
        if scaler is None:
            image, target = augment(image, None if pseudo is None else pseudo[index.to(pseudo.device)])
            if target is None:
                with torch.no_grad():
                    target = teacher(image)
            student.train()
            optimizer.zero_grad(set_to_none=False)
            loss_function.components(student(image), target, label)["loss"].backward()
            optimizer.step()
            return
        image, target = augment(image, None if pseudo is None else pseudo[index.to(pseudo.device)])
        student.train()
        optimizer.zero_grad(set_to_none=False)
        with torch.autocast("cuda"):  # as DistillationTrainer: teacher forward, student forward and loss
            if target is None:
                with torch.no_grad():
                    target = teacher(image)
            loss = loss_function.components(student(image), target, label)["loss"]
        backward_step(loss, optimizer, scaler)

    bundle, plain, ratio, peak = interleaved(trainer, plain_loop(step, images, labels, config["batch_size"], device),
                                             warmup, device)
    return len(items), len(items) / bundle, len(items) / plain, ratio, peak


def overrides_of(device: str = "cpu", amp: bool = False, width: float | None = None, image_size: int | None = None,
                 batch_size: int | None = None, num_workers: int | None = None) -> dict:
    """The config keys the command line overrides: device and AMP always (defaults: the CPU without AMP; AMP only
    on a GPU), the rest when given."""
    keys = {"device": f"$torch.device({device!r})", "amp": bool(amp) and torch.device(device).type == "cuda"}
    named = {"network_width": width, "image_size": image_size, "batch_size": batch_size, "num_workers": num_workers}
    return keys | {key: value for key, value in named.items() if value is not None}


def run(n_images: int = 96, size: int = 128, warmup: int = 1, epochs: int = 5, threads: int | None = None,
        seed: int = 0, pseudo_in_memory: bool = True,
        overrides: dict | None = None) -> tuple[list[list], float, list[float]]:
    """The table's rows ``[stage, images, bundle img/s, plain img/s, ratio]``, the lowest ratio and each row's
    bundle-trainer peak memory (MB above its start)."""
    if threads:
        torch.set_num_threads(threads)
    rows, peaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_patches(Path(tmp) / "data", n_images, size, seed)
        work = Path(tmp) / "work"
        benches = [
            ("stage 1", lambda: bench_stage1(data_dir, work, warmup, epochs, overrides)),
            ("stage 2 cached",
             lambda: bench_stage2(data_dir, work, warmup, epochs, True, pseudo_in_memory, overrides)),
            ("stage 2 teacher", lambda: bench_stage2(data_dir, work, warmup, epochs, False, overrides=overrides)),
        ]
        for name, bench in benches:
            count, bundle, plain, ratio, peak = bench()
            rows.append([name, count, bundle, plain, ratio])
            peaks.append(peak)
    return rows, min(row[-1] for row in rows), peaks


def main(n_images: int = 96, size: int = 128, warmup: int = 1, epochs: int = 5, threads: int | None = None,
         seed: int = 0, pseudo_in_memory: bool = True, device: str = "cpu", amp: bool = False,
         width: float | None = None, image_size: int | None = None, batch_size: int | None = None,
         num_workers: int | None = None, json_out: str | None = None) -> None:
    """Print the setting, the table and, last, ``train_vs_plain=<lowest ratio>``.

    Args:
        n_images: patches generated (the config's validation split, 15 %, is held out of training).
        size: side of the generated patches (the config resizes to its ``image_size``, 128).
        warmup: epoch pairs run before timing starts.
        epochs: timed epoch pairs (bundle, then plain); the medians are reported.
        threads: torch threads for both sides (default: torch's).
        seed: seed of the generated images.
        pseudo_in_memory: False decodes every pseudo-label file on every sample, as before they were kept.
        device: torch device of both sides (``cuda`` for a GPU).
        amp: CUDA autocast + GradScaler on both sides (ignored on a CPU).
        width, image_size, batch_size, num_workers: override the configs' ``network_width``, ``image_size``,
            ``batch_size`` and ``num_workers``.
        json_out: also write the setting and the rows (with each row's peak memory) to this JSON file.
    """
    overrides = overrides_of(device, amp, width, image_size, batch_size, num_workers)
    rows, ratio, peaks = run(n_images, size, warmup, epochs, threads, seed, pseudo_in_memory, overrides)
    knobs = ConfigParser.load_config_files([str(CONFIGS / name) for name in CONFIG_FILES]) | overrides
    amp_on = bool(amp) and torch.device(device).type == "cuda"
    print(
        f"{' + '.join(CONFIG_FILES)}: DWS-MIL width {knobs['network_width']}, {knobs['image_size']} px, batch "
        f"{knobs['batch_size']}, {knobs['num_workers']} workers; {torch.get_num_threads()} torch threads; "
        f"{epochs} alternating bundle/plain epoch pair(s) after {warmup} warm-up (median img/s, median of the pairs' "
        f"ratios); pseudo-labels kept in memory: {pseudo_in_memory}"
        + ("" if device == "cpu" else f"; device {device}{', AMP' if amp_on else ''}")
    )
    print(format_table(COLUMNS, rows, sep="  "))
    if device != "cpu":
        print("peak memory of the bundle trainers' runs above their start (max_memory_allocated): "
              + ", ".join(f"{row[0]} {peak:.0f} MB" for row, peak in zip(rows, peaks)))
    if json_out:
        setting = {key: knobs[key] for key in ("network_width", "image_size", "batch_size", "num_workers")}
        record = {"device": device, "amp": amp_on, **setting, "threads": torch.get_num_threads(), "epochs": epochs,
                  "warmup": warmup, "train_vs_plain": ratio,
                  "rows": [{"stage": row[0], "images": row[1], "bundle_img_s": row[2], "plain_img_s": row[3],
                            "ratio": row[4], "bundle_peak_mb": peak} for row, peak in zip(rows, peaks)]}
        Path(json_out).write_text(json.dumps(record, indent=1))
    print(f"train_vs_plain={ratio:.2f}")


if __name__ == "__main__":
    report_input_errors()
    fire.Fire(main)
