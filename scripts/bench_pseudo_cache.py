"""Stage-2 epoch time with cached pseudo-labels vs a teacher forward on every step (CPU, synthetic images).

    python scripts/bench_pseudo_cache.py --n_images 64 --size 128 --epochs 3
"""

from __future__ import annotations

import tempfile
import time

import fire
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset

from custom.engines import DistillationTrainer
from custom.handlers import PseudoLabelHandler
from custom.losses import DistillationLoss
from custom.networks import DWSMIL
from custom.transforms import LoadPseudoLabeld


def _epoch_seconds(trainer: DistillationTrainer) -> list[float]:
    """Run the trainer and return the wall time of each epoch."""
    starts, seconds = [], []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: starts.append(time.perf_counter()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: seconds.append(time.perf_counter() - starts[-1]))
    trainer.run()
    return seconds


def main(
    n_images: int = 64,
    size: int = 128,
    batch_size: int = 16,
    epochs: int = 3,
    width: float = 0.25,
    threads: int | None = None,
    seed: int = 0,
) -> None:
    """Print per-epoch seconds of both modes (first epoch dropped as warm-up), their ratio and the cache cost."""
    if epochs < 2:
        raise ValueError(f"epochs must be at least 2 (the first is a warm-up), got {epochs}.")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    items = [{"image": torch.rand(3, size, size), "label": i % 2, "name": f"img{i:04d}"} for i in range(n_images)]
    teacher, student = DWSMIL(width=width), DWSMIL(width=width)
    with tempfile.TemporaryDirectory() as pseudo_dir:
        start = time.perf_counter()
        PseudoLabelHandler(DataLoader(items, batch_size=batch_size), pseudo_dir).write(teacher, "cpu")
        write_seconds = time.perf_counter() - start
        mean_epoch = {}
        for mode, pseudo_key in (("teacher_forward", None), ("cached", "pseudo")):
            data = Dataset(items, transform=LoadPseudoLabeld(pseudo_dir)) if pseudo_key else items
            network = DWSMIL(width=width)
            network.load_state_dict(student.state_dict())
            trainer = DistillationTrainer(
                device="cpu",
                max_epochs=epochs,
                train_data_loader=DataLoader(data, batch_size=batch_size, shuffle=True),
                network=network,
                teacher=teacher,
                optimizer=torch.optim.Adam(network.parameters(), lr=5e-5, weight_decay=5e-5),
                loss_function=DistillationLoss(),
                pseudo_key=pseudo_key,
                decollate=False,
            )
            seconds = _epoch_seconds(trainer)[1:]
            mean_epoch[mode] = sum(seconds) / len(seconds)
    forward, cached = mean_epoch["teacher_forward"], mean_epoch["cached"]
    print(
        f"{n_images} images {size}x{size}, DWS-MIL width {width}, batch {batch_size}, "
        f"{torch.get_num_threads()} threads: "
        f"teacher forward {forward:.2f} s/epoch, cached {cached:.2f} s/epoch, speed-up x{forward / cached:.2f}; "
        f"writing the cache once takes {write_seconds:.2f} s (paid again after each swap)"
    )


if __name__ == "__main__":
    fire.Fire(main)
