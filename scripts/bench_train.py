# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Training throughput: the bundle's trainers, built from train.json + cpu_train.json, against plain PyTorch loops.

Three rows, each the bundle's trainer and a plain loop doing the same work in the same process, on the same images:

- ``stage 1``: the config's ``train#trainer`` (MONAI ``SupervisedTrainer``, DWS-MIL, ``MILPoolingLoss``, the
  cached ``PatchFolderDataset`` with per-sample normalisation, its handlers) against a loop over the same network
  class, loss, optimizer and batch with the images in memory as one tensor, normalised per batch;
- ``stage 2 cached``: the config's ``distill#trainer`` (``custom.engines.DistillationTrainer``, ``DistillationLoss``,
  ``LoadPseudoLabeld`` reading the pseudo-labels its handler wrote, ``RandFlipd`` + ``RandRotate90d``) against a loop
  with the teacher's maps in memory and the same flips and rotations drawn per image on the batch;
- ``stage 2 teacher``: the same with ``cache_pseudo_labels: false`` (a no-grad teacher forward every batch), against
  a loop that runs the teacher the same way.

The images are random RGB PNG patches written to a temporary folder in the layout ``patch_folder_datalist`` reads
(nothing is downloaded). Validation is pushed past the last epoch (``val_interval``) and the role swap is off, so the
timed window is training only: from the epoch's start to its last iteration's end, which includes every per-iteration
handler the config attaches (progress bar, TensorBoard). The first ``warmup`` epochs are not timed; each figure is the
median over the ``epochs`` timed ones. Both sides use the process's torch threads (``--threads``).

    python scripts/bench_train.py                      # 96 patches (80 trained on), 1 warm-up + 3 timed epochs per row
    python scripts/bench_train.py --n_images 256 --epochs 5 --threads 2
    python scripts/bench_train.py --pseudo_in_memory False   # LoadPseudoLabeld decoding every file every time

The last line is ``train_vs_plain=<ratio>``: the lowest of the rows' bundle / plain images-per-second ratios.
"""

from __future__ import annotations

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
                  pseudo_in_memory: bool = True) -> ConfigParser:
    """train.json + cpu_train.json over ``data_dir``, outputs under ``work_dir``, no validation and no role swap;
    ``pseudo_in_memory`` False makes ``LoadPseudoLabeld`` decode its file on every sample (the behaviour before
    it kept decoded maps), to measure what keeping them saves."""
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
        }
    )
    for transform in parser["distill"]["transforms"]:
        if isinstance(transform, dict) and transform.get("_target_") == "custom.transforms.LoadPseudoLabeld":
            transform["keep_in_memory"] = pseudo_in_memory
    set_determinism(seed=seed)
    return parser


def epoch_seconds(engine: Engine) -> list[float]:
    """Run ``engine``; the seconds from each epoch's start to its last iteration's end (after every handler
    attached before this one on those events: the config's seeding, progress bar and per-iteration logging)."""
    starts: list[float] = []
    ends: dict[int, float] = {}
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: starts.append(time.perf_counter()))
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: ends.__setitem__(e.state.epoch, time.perf_counter()))
    engine.run()
    return [ends[epoch + 1] - start for epoch, start in enumerate(starts)]


def load_images(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images as one (N, 3, H, W) float tensor in [0, 1] and their (N,) float labels."""
    images = np.stack([read_rgb(item["image"]) for item in items])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return pixels, torch.tensor([float(item["label"]) for item in items])


def augment(image: torch.Tensor, pseudo: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distillation augmentation drawn per image on a batch: a row flip (p 0.5), then a 90-degree turn (p 0.5),
    image and pseudo-label together, as ``RandFlipd(spatial_axis=0)`` and ``RandRotate90d`` do per sample."""
    for op, draw in ((lambda t: t.flip(-2), torch.rand(image.shape[0]) < 0.5),
                     (lambda t: t.rot90(1, (-2, -1)), torch.rand(image.shape[0]) < 0.5)):
        if draw.any():
            image = image.clone()
            image[draw] = op(image[draw])
            if pseudo is not None:
                pseudo = pseudo.clone()
                pseudo[draw] = op(pseudo[draw])
    return image, pseudo


def plain_loop(step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None], images: torch.Tensor,
               labels: torch.Tensor, batch_size: int, epochs: int) -> list[float]:
    """Seconds of each epoch of shuffled batches (index order, normalised per batch) handed to ``step``."""
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(images.shape[0])
        for batch in order.split(batch_size):
            step(batch, (images[batch] - MEAN) / STD, labels[batch])
        seconds.append(time.perf_counter() - start)
    return seconds


def plain_network(config: ConfigParser, source: torch.nn.Module) -> torch.nn.Module:
    """A fresh network of the config's class and width holding ``source``'s weights."""
    network = DWSMIL(width=config["network_width"])
    network.load_state_dict(source.state_dict())
    return network


def plain_optimizer(config: ConfigParser, network: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam with the config's learning rate and weight decay, as train.json builds it."""
    return torch.optim.Adam(network.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"])


def bench_stage1(data_dir: Path, work_dir: Path, warmup: int, epochs: int) -> tuple[int, float, float]:
    """(images per epoch, bundle img/s, plain img/s) of stage 1."""
    config = bundle_config(data_dir, work_dir / "stage1", warmup + epochs)
    trainer = config.get_parsed_content("train#trainer")
    items = config.get_parsed_content("train#datalist")
    start_weights = plain_network(config, config.get_parsed_content("teacher"))
    bundle = statistics.median(epoch_seconds(trainer)[warmup:])

    images, labels = load_images(items)
    network = plain_network(config, start_weights)
    optimizer = plain_optimizer(config, network)
    loss_function = MILPoolingLoss(r=4.0)
    network.train()

    def step(index: torch.Tensor, image: torch.Tensor, label: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=False)
        loss_function(network(image), label).backward()
        optimizer.step()

    plain = statistics.median(plain_loop(step, images, labels, config["batch_size"], warmup + epochs)[warmup:])
    return len(items), len(items) / bundle, len(items) / plain


def bench_stage2(data_dir: Path, work_dir: Path, warmup: int, epochs: int, cache: bool,
                 pseudo_in_memory: bool = True) -> tuple[int, float, float]:
    """(images per epoch, bundle img/s, plain img/s) of stage 2, with the pseudo-label cache or a teacher forward."""
    folder = work_dir / f"stage2_{'cached' if cache else 'teacher'}"
    config = bundle_config(data_dir, folder, warmup + epochs, cache, pseudo_in_memory=pseudo_in_memory)
    trainer = config.get_parsed_content("distill#trainer")
    items = config.get_parsed_content("train#datalist")
    teacher = plain_network(config, config.get_parsed_content("teacher")).eval().requires_grad_(False)
    student = plain_network(config, config.get_parsed_content("student"))
    bundle = statistics.median(epoch_seconds(trainer)[warmup:])

    images, labels = load_images(items)
    optimizer = plain_optimizer(config, student)
    loss_function = DistillationLoss(
        lambda_wce=config["lambda_wce"], use_wce=config["use_wce"], wce_threshold=config["wce_threshold"],
        target=config["distill_target"],
    )
    pseudo = None
    if cache:  # the teacher's fused maps, computed once as the pseudo-label handler does, kept in memory
        with torch.no_grad():
            pseudo = torch.cat([teacher((images[i:i + 16] - MEAN) / STD)[:, -1:] for i in range(0, len(images), 16)])

    def step(index: torch.Tensor, image: torch.Tensor, label: torch.Tensor) -> None:
        image, target = augment(image, None if pseudo is None else pseudo[index])
        if target is None:
            with torch.no_grad():
                target = teacher(image)
        student.train()
        optimizer.zero_grad(set_to_none=False)
        loss_function.components(student(image), target, label)["loss"].backward()
        optimizer.step()

    plain = statistics.median(plain_loop(step, images, labels, config["batch_size"], warmup + epochs)[warmup:])
    return len(items), len(items) / bundle, len(items) / plain


def run(n_images: int = 96, size: int = 128, warmup: int = 1, epochs: int = 3, threads: int | None = None,
        seed: int = 0, pseudo_in_memory: bool = True) -> tuple[list[list], float]:
    """The table's rows ``[stage, images, bundle img/s, plain img/s, ratio]`` and the lowest ratio."""
    if threads:
        torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_patches(Path(tmp) / "data", n_images, size, seed)
        work = Path(tmp) / "work"
        benches = [
            ("stage 1", lambda: bench_stage1(data_dir, work, warmup, epochs)),
            ("stage 2 cached", lambda: bench_stage2(data_dir, work, warmup, epochs, True, pseudo_in_memory)),
            ("stage 2 teacher", lambda: bench_stage2(data_dir, work, warmup, epochs, False)),
        ]
        for name, bench in benches:
            count, bundle, plain = bench()
            rows.append([name, count, bundle, plain, bundle / plain])
    return rows, min(row[-1] for row in rows)


def main(n_images: int = 96, size: int = 128, warmup: int = 1, epochs: int = 3, threads: int | None = None,
         seed: int = 0, pseudo_in_memory: bool = True) -> None:
    """Print the setting, the table and, last, ``train_vs_plain=<lowest ratio>``.

    Args:
        n_images: patches generated (the config's validation split, 15 %, is held out of training).
        size: side of the generated patches (the config resizes to its ``image_size``, 128).
        warmup: epochs run before timing starts.
        epochs: timed epochs; the median is reported.
        threads: torch threads for both sides (default: torch's).
        seed: seed of the generated images.
        pseudo_in_memory: False decodes every pseudo-label file on every sample, as before they were kept.
    """
    rows, ratio = run(n_images, size, warmup, epochs, threads, seed, pseudo_in_memory)
    knobs = ConfigParser.load_config_files([str(CONFIGS / name) for name in CONFIG_FILES])
    print(
        f"{' + '.join(CONFIG_FILES)}: DWS-MIL width {knobs['network_width']}, {knobs['image_size']} px, batch "
        f"{knobs['batch_size']}, {knobs['num_workers']} workers; {torch.get_num_threads()} torch threads; "
        f"median of {epochs} epoch(s) after {warmup} warm-up; pseudo-labels kept in memory: {pseudo_in_memory}"
    )
    print(format_table(COLUMNS, rows, sep="  "))
    print(f"train_vs_plain={ratio:.2f}")


if __name__ == "__main__":
    fire.Fire(main)
