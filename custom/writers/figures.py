"""Pictures worth looking at after a run: training curves and mask overlays on tissue."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Series = Sequence[tuple[float, float]]  # (epoch or iteration, value)


def plot_curves(
    panels: Mapping[str, Mapping[str, Series]], path: str | Path, title: str = "", marks: Sequence[float] = ()
) -> Path:
    """Draw one panel per quantity (e.g. loss, validation F1), with dashed vertical lines at ``marks`` (role swaps)."""
    panels = {name: series for name, series in panels.items() if any(len(s) for s in series.values())}
    if not panels:
        raise ValueError(f"nothing to plot for {path}: every series is empty")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, points in series.items():
            if len(points):
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if len(points) < 60 else None, label=label)
        for x in marks:
            ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def overlay(
    image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 0), alpha: float = 0.4
) -> np.ndarray:
    """Tint the masked pixels of an RGB (rows, cols, 3) image so the tissue stays readable under the mask."""
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"overlay: image {image.shape[:2]} and mask {mask.shape[:2]} differ in size (rows, cols)")
    out = image.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def plot_overlays(
    images: Sequence[np.ndarray],
    columns: Mapping[str, Sequence[np.ndarray]],
    path: str | Path,
    names: Sequence[str] | None = None,
    threshold: float = 0.5,
) -> Path:
    """One row per image: the tissue, then each named probability map (e.g. truth, teacher, student) overlaid at
    threshold."""
    colors = [(0, 200, 0), (230, 120, 0), (0, 90, 255), (200, 0, 200)]
    n_rows, n_cols = len(images), 1 + len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 2.6 * n_rows), squeeze=False)
    for r, image in enumerate(images):
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(names[r] if names else "image", fontsize=7)
        for c, (label, maps) in enumerate(columns.items(), start=1):
            prob = np.asarray(maps[r], dtype=np.float32)
            axes[r, c].imshow(overlay(image, prob >= threshold, colors[(c - 1) % len(colors)]))
            axes[r, c].set_title(f"{label} (mean p={prob.mean():.2f})", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Write and close, so long runs that plot every round do not leak figures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
