# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The H&E-like renderer of the synthetic slides: a slide's layout (tissue, tumour polygons) and its tiles and masks.

Tumour differs from normal tissue in morphology, not colour: normal tissue is pink stroma with sparse spindle nuclei
and regular glands (rings of small round nuclei around white lumens); tumour is crowded, large, irregular,
disorganised nuclei on the same stroma, drawn from the same stain colours. Tumour regions are smooth polygons in
level-0 ``(x, y)`` pixels inside the tissue; they alone define the pixel masks and the XML.

Rendering is tile-local: every random quantity is a hash of (slide seed, object kind, grid cell, slot), so a tile
depends only on its position and slides of any size are written tile by tile with flat memory.
Arrays and tile requests are in numpy ``(row, col)`` order; polygons are ``(x, y)``.
The data set built from it is ``custom.data.synthetic``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from matplotlib.path import Path as MplPath
from skimage.draw import polygon as draw_polygon

__all__ = ["SlideLayout", "make_layout", "render_tile", "render_mask", "tissue_fraction"]

# Stain colours (RGB) shared by tumour and normal tissue, so that colour alone cannot tell them apart.
_BACKGROUND = np.array([243.0, 242.0, 245.0], np.float32)
_STROMA = np.array([232.0, 162.0, 200.0], np.float32)
_EPITHELIUM = np.array([214.0, 150.0, 196.0], np.float32)
_LUMEN = np.array([240.0, 232.0, 240.0], np.float32)
_NUCLEUS = np.array([92.0, 58.0, 140.0], np.float32)

_NUCLEUS_CELL = 32  # grid cell (pixels) of tumour and stromal nuclei
_NUCLEUS_SLOTS = 10  # candidate nuclei per cell; each kept with its region's probability
_NUCLEUS_MARGIN = 12  # largest nucleus radius, so neighbouring cells' nuclei that reach into a tile are drawn
_GLAND_CELL = 160  # grid cell (pixels) of normal glands, at most one per cell
_GLAND_MARGIN = 60  # largest gland radius (lumen + epithelium)
_EPITHELIUM_WIDTH = 12.0

# hash keys: one per kind of random object, so that streams never collide
_KEY_NUCLEUS, _KEY_GLAND, _KEY_EPITHELIUM, _KEY_NOISE, _KEY_STROMA_COARSE, _KEY_STROMA_FINE = range(6)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-spread 64-bit integer hash."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _hash_uniform(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform [0, 1) numbers that are a pure function of (seed, keys): the basis of tile-local rendering."""
    arrays = np.broadcast_arrays(*[np.asarray(k, np.int64) for k in keys])
    h = np.full(arrays[0].shape, (seed * 0x9E3779B97F4A7C15 + 1) % 2**64, np.uint64)
    for key in arrays:
        h = _mix(h ^ (key.view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _lattice_position(coords: np.ndarray, spacing: int) -> tuple[np.ndarray, np.ndarray]:
    """Lattice cell of each pixel coordinate and its smoothstep weight towards the next lattice point."""
    frac = (coords % spacing).astype(np.float32) / spacing
    return coords // spacing, frac * frac * (3 - 2 * frac)


def _value_noise(seed: int, key: int, rows: np.ndarray, cols: np.ndarray, spacing: int) -> np.ndarray:
    """Smooth [0, 1) noise on a (rows x cols) pixel grid: hashed lattice values interpolated along rows, then cols."""
    lat_r, w_r = _lattice_position(rows, spacing)
    lat_c, w_c = _lattice_position(cols, spacing)
    grid_r = np.arange(lat_r[0], lat_r[-1] + 2)
    grid_c = np.arange(lat_c[0], lat_c[-1] + 2)
    lattice = _hash_uniform(seed, key, grid_r[:, None], grid_c[None, :]).astype(np.float32)
    i, j = lat_r - grid_r[0], lat_c - grid_c[0]
    along_rows = lattice[i] * (1 - w_r)[:, None] + lattice[i + 1] * w_r[:, None]
    return along_rows[:, j] * (1 - w_c) + along_rows[:, j + 1] * w_c


@dataclass(frozen=True)
class _Blob:
    """A smooth irregular star-shaped region: radius(theta) = radius * (1 + sum_k amps_k cos(k theta + phases_k))."""

    cx: float
    cy: float
    radius: float
    amps: tuple[float, ...]
    phases: tuple[float, ...]

    def radius_at(self, theta: np.ndarray) -> np.ndarray:
        """Boundary distance from the centre in direction theta."""
        wobble = sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(zip(self.amps, self.phases)))
        return self.radius * (1 + wobble)

    def alpha(self, row: int, col: int, height: int, width: int) -> np.ndarray | float:
        """Tissue opacity of a level-0 region (2-pixel soft edge); a scalar when the region is wholly in or out."""
        near_x, near_y = np.clip(self.cx, col, col + width - 1), np.clip(self.cy, row, row + height - 1)
        far_x = max(abs(col - self.cx), abs(col + width - 1 - self.cx))
        far_y = max(abs(row - self.cy), abs(row + height - 1 - self.cy))
        wobble = sum(self.amps)
        if np.hypot(near_x - self.cx, near_y - self.cy) > self.radius * (1 + wobble) + 2:
            return 0.0
        if np.hypot(far_x, far_y) < self.radius * (1 - wobble) - 2:
            return 1.0
        dx = np.arange(col, col + width, dtype=np.float32)[None, :] - np.float32(self.cx)
        dy = np.arange(row, row + height, dtype=np.float32)[:, None] - np.float32(self.cy)
        return np.clip((self.radius_at(np.arctan2(dy, dx)) - np.hypot(dx, dy)) / 2 + 0.5, 0, 1)

    def inside(self, x: np.ndarray, y: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """True where level-0 (x, y) lies at least ``margin`` pixels (measured radially) inside the boundary."""
        dx, dy = x - self.cx, y - self.cy
        return np.hypot(dx, dy) + margin < self.radius_at(np.arctan2(dy, dx))

    def polygon(self, n_vertices: int = 160) -> np.ndarray:
        """(n, 2) level-0 (x, y) vertices of the boundary."""
        theta = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
        r = self.radius_at(theta)
        return np.stack([self.cx + r * np.cos(theta), self.cy + r * np.sin(theta)], axis=1)


def _random_blob(rng: np.random.Generator, cx: float, cy: float, radius: float, roughness: float) -> _Blob:
    """A blob with random low-order wobble (orders 2-5), amplitudes summing to at most ``roughness``."""
    amps = rng.dirichlet(np.ones(4)) * roughness * rng.uniform(0.6, 1.0)
    return _Blob(cx, cy, radius, tuple(amps.tolist()), tuple(rng.uniform(0, 2 * np.pi, 4).tolist()))


@dataclass(frozen=True, eq=False)  # holds arrays: compare layouts by identity
class SlideLayout:
    """Everything that defines one square slide: size, tissue blobs, tumour polygons and its hash seed."""

    size: int
    seed: int
    tissue: tuple[_Blob, ...]
    tumours_xy: tuple[np.ndarray, ...]

    @cached_property
    def tumour_paths(self) -> list[MplPath]:
        """Tumour polygons as matplotlib paths, for point-in-tumour tests of nucleus centres."""
        return [MplPath(p) for p in self.tumours_xy]

    def in_tissue(self, x: np.ndarray, y: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """True where level-0 (x, y) lies inside a tissue blob by at least ``margin`` pixels."""
        return np.logical_or.reduce([blob.inside(x, y, margin) for blob in self.tissue])

    def in_tumour(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True where level-0 (x, y) lies inside a tumour polygon."""
        points = np.stack([np.ravel(x), np.ravel(y)], axis=1)
        hits = np.zeros(len(points), bool)
        for path in self.tumour_paths:
            hits |= path.contains_points(points)
        return hits.reshape(np.shape(x))


def _tissue_blobs(rng: np.random.Generator, size: int) -> tuple[_Blob, ...]:
    """One or two tissue blobs covering roughly 30-50% of the slide, redrawn until they do."""
    while True:
        if rng.random() < 0.5:
            cx, cy = size * (0.5 + rng.uniform(-0.04, 0.04, 2))
            blobs = (_random_blob(rng, cx, cy, size * rng.uniform(0.33, 0.38), 0.25),)
        else:  # two blobs either side of the centre
            offset, angle = size * rng.uniform(0.2, 0.23), rng.uniform(0, np.pi)
            dx, dy = offset * np.cos(angle), offset * np.sin(angle)
            blobs = tuple(
                _random_blob(rng, size / 2 + s * dx, size / 2 + s * dy, size * rng.uniform(0.23, 0.27), 0.25)
                for s in (-1, 1)
            )
        layout = SlideLayout(size, 0, blobs, ())
        inside_slide = all(((b.polygon(64) > 0.02 * size) & (b.polygon(64) < 0.98 * size)).all() for b in blobs)
        if inside_slide and 0.3 <= tissue_fraction(layout) <= 0.5:
            return blobs


def _tumour_polygons(rng: np.random.Generator, layout: SlideLayout, count: int) -> tuple[np.ndarray, ...]:
    """``count`` smooth tumour polygons, each lying inside the tissue with a margin and not overlapping another."""
    polygons: list[np.ndarray] = []
    margin = 0.02 * layout.size
    while len(polygons) < count:
        blob = layout.tissue[rng.integers(len(layout.tissue))]
        theta, reach = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6)
        r = reach * blob.radius_at(np.array(theta))
        cx, cy = blob.cx + r * np.cos(theta), blob.cy + r * np.sin(theta)
        vertices = _random_blob(rng, cx, cy, layout.size * rng.uniform(0.05, 0.11), 0.3).polygon()
        inside = layout.in_tissue(vertices[:, 0], vertices[:, 1], margin).all()
        apart = all(
            not MplPath(p).contains_points(vertices).any() and not MplPath(vertices).contains_points(p).any()
            for p in polygons
        )
        if inside and apart:
            polygons.append(vertices)
    return tuple(polygons)


def make_layout(seed: int, index: int, size: int, positive: bool) -> SlideLayout:
    """The layout of slide ``index`` of a data set: deterministic in (seed, index, size, positive)."""
    if size < 512:
        raise ValueError(f"slide size must be at least 512 pixels, got {size}")
    rng = np.random.default_rng([seed, index, size])
    tissue = _tissue_blobs(rng, size)
    slide_seed = int(rng.integers(2**62))
    layout = SlideLayout(size, slide_seed, tissue, ())
    if not positive:
        return layout
    return SlideLayout(size, slide_seed, tissue, _tumour_polygons(rng, layout, int(rng.integers(1, 4))))


def tissue_fraction(layout: SlideLayout, samples: int = 256) -> float:
    """Fraction of the slide covered by tissue, estimated on a samples x samples grid (fixed cost at any size)."""
    centres = (np.arange(samples) + 0.5) * layout.size / samples
    return float(layout.in_tissue(centres[None, :], centres[:, None]).mean())


def render_mask(layout: SlideLayout, row: int, col: int, height: int, width: int) -> np.ndarray:
    """(height, width) uint8 tumour mask (0 or 255) of the level-0 region at (row, col): the polygons rasterised.

    A pixel is tumour when its centre, level-0 (col + 0.5, row + 0.5), lies inside a polygon: the convention of
    ``custom.data.annotations.rasterize_annotations``, so the mask TIFF and the XML give the same pixels.
    """
    mask = np.zeros((height, width), np.uint8)
    for polygon_xy in layout.tumours_xy:
        x, y = polygon_xy[:, 0] - col - 0.5, polygon_xy[:, 1] - row - 0.5
        if x.max() < 0 or y.max() < 0 or x.min() >= width or y.min() >= height:
            continue
        rr, cc = draw_polygon(y, x, shape=(height, width))
        mask[rr, cc] = 255
    return mask


def _nuclei(layout: SlideLayout, row: int, col: int, height: int, width: int) -> np.ndarray:
    """Tumour and stromal nuclei that may reach into the region.

    Rows of (x, y, semi-axis a, semi-axis b, angle, irregularity, phase, darkness), centres in level-0 (x, y).
    """
    cell, reach = _NUCLEUS_CELL, _NUCLEUS_MARGIN
    cy = np.arange((row - reach) // cell, (row + height + reach) // cell + 1)
    cx = np.arange((col - reach) // cell, (col + width + reach) // cell + 1)
    slot, attribute = np.arange(_NUCLEUS_SLOTS), np.arange(9)
    cells_y, cells_x = cy[:, None, None, None], cx[None, :, None, None]
    u = _hash_uniform(layout.seed, _KEY_NUCLEUS, cells_y, cells_x, slot[:, None], attribute)
    u = u.reshape(-1, len(attribute))
    cyy, cxx = np.meshgrid(cy, cx, indexing="ij")
    x = (np.repeat(cxx.ravel(), _NUCLEUS_SLOTS) + u[:, 0]) * cell
    y = (np.repeat(cyy.ravel(), _NUCLEUS_SLOTS) + u[:, 1]) * cell
    tissue = layout.in_tissue(x, y)
    tumour = tissue & layout.in_tumour(x, y) if layout.tumours_xy else np.zeros_like(tissue)
    keep = np.where(tumour, u[:, 2] < 0.5, tissue & (u[:, 2] < 0.14))
    # tumour: large, pleomorphic, irregular, variably dark; stroma: thin spindles
    a = np.where(tumour, 5.5 + 3.5 * u[:, 3], 5.0 + 3.0 * u[:, 3])
    b = np.where(tumour, a * (0.55 + 0.45 * u[:, 4]), 1.8 + 1.0 * u[:, 4])
    irregularity = np.where(tumour, 0.08 + 0.22 * u[:, 6], 0.0)
    darkness = np.where(tumour, 0.8 + 0.35 * u[:, 8], 0.9 + 0.15 * u[:, 8])
    nuclei = np.stack([x, y, a, b, np.pi * u[:, 5], irregularity, 2 * np.pi * u[:, 7], darkness], axis=1)
    return nuclei[keep]


def _glands(layout: SlideLayout, row: int, col: int, height: int, width: int) -> np.ndarray:
    """Normal glands near the region: rows of (x, y, lumen semi-axis a, b, angle, gland row, gland col)."""
    cell, reach = _GLAND_CELL, _GLAND_MARGIN
    gy = np.arange((row - reach) // cell, (row + height + reach) // cell + 1)
    gx = np.arange((col - reach) // cell, (col + width + reach) // cell + 1)
    gyy, gxx = [g.ravel() for g in np.meshgrid(gy, gx, indexing="ij")]
    u = _hash_uniform(layout.seed, _KEY_GLAND, gyy[:, None], gxx[:, None], np.arange(6)[None, :])
    x, y = (gxx + 0.35 + 0.3 * u[:, 0]) * cell, (gyy + 0.35 + 0.3 * u[:, 1]) * cell
    a = 20.0 + 16.0 * u[:, 2]
    b = a * (0.65 + 0.35 * u[:, 3])
    outer = a + _EPITHELIUM_WIDTH + 6
    ring = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    ring_x, ring_y = x[:, None] + outer[:, None] * np.cos(ring), y[:, None] + outer[:, None] * np.sin(ring)
    keep = (u[:, 5] < 0.6) & layout.in_tissue(ring_x, ring_y).all(axis=1)
    if layout.tumours_xy:
        keep &= ~layout.in_tumour(np.c_[x, ring_x], np.c_[y, ring_y]).any(axis=1)
    return np.stack([x, y, a, b, np.pi * u[:, 4], gyy, gxx], axis=1)[keep]


def _epithelial_nuclei(layout: SlideLayout, glands: np.ndarray) -> np.ndarray:
    """Regular rings of small round nuclei around each gland lumen, in the layout of ``_nuclei``."""
    rings = []
    for x, y, a, b, angle, gy, gx in glands:
        count = int(2 * np.pi * np.sqrt((a * a + b * b) / 2) / 9)
        u = _hash_uniform(layout.seed, _KEY_EPITHELIUM, int(gy), int(gx), np.arange(count)[:, None], np.arange(4))
        t = 2 * np.pi * (np.arange(count) + 0.15 * u[:, 0]) / count
        ex, ey = (a + 5) * np.cos(t), (b + 5) * np.sin(t)
        radius = 3.3 + 0.9 * u[:, 1]
        rings.append(
            np.stack(
                [
                    x + ex * np.cos(angle) - ey * np.sin(angle),
                    y + ex * np.sin(angle) + ey * np.cos(angle),
                    radius,
                    radius * (0.85 + 0.15 * u[:, 2]),
                    t,
                    np.zeros(count),
                    2 * np.pi * u[:, 3],
                    np.full(count, 0.95),
                ],
                axis=1,
            )
        )
    return np.concatenate(rings) if rings else np.zeros((0, 8))


def _paint_glands(image: np.ndarray, tissue: np.ndarray, glands: np.ndarray, row: int, col: int) -> None:
    """Draw each gland's epithelial band and white lumen into the (row, col)-anchored RGB float image."""
    height, width = tissue.shape
    for x, y, a, b, angle, _, _ in glands:
        extent = a + _EPITHELIUM_WIDTH + 2
        r0, r1 = max(int(y - extent) - row, 0), min(int(y + extent) + 1 - row, height)
        c0, c1 = max(int(x - extent) - col, 0), min(int(x + extent) + 1 - col, width)
        if r0 >= r1 or c0 >= c1:
            continue
        dy, dx = np.mgrid[r0 + row : r1 + row, c0 + col : c1 + col].astype(np.float32)
        dx, dy = dx - x, dy - y
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        q = np.sqrt((u / a) ** 2 + (v / b) ** 2) * a  # approximate distance-from-centre in lumen-radius pixels
        band = np.clip(a + _EPITHELIUM_WIDTH - q, 0, 1)[..., None] * tissue[r0:r1, c0:c1, None]
        lumen = np.clip(a - q, 0, 1)[..., None] * tissue[r0:r1, c0:c1, None]
        patch = image[r0:r1, c0:c1]
        patch[:] = patch * (1 - band) + _EPITHELIUM * band
        patch[:] = patch * (1 - lumen) + _LUMEN * lumen


def _paint_nuclei(image: np.ndarray, texture: np.ndarray, nuclei: np.ndarray, row: int, col: int) -> None:
    """Alpha-blend each (possibly irregular, rotated) elliptical nucleus with chromatin texture into the image."""
    height, width = image.shape[:2]
    for x, y, a, b, angle, irregularity, phase, darkness in nuclei:
        extent = a * (1 + irregularity) + 1
        r0, r1 = max(int(y - extent) - row, 0), min(int(y + extent) + 2 - row, height)
        c0, c1 = max(int(x - extent) - col, 0), min(int(x + extent) + 2 - col, width)
        if r0 >= r1 or c0 >= c1:
            continue
        dy = np.arange(r0 + row, r1 + row, dtype=np.float32)[:, None] - np.float32(y)
        dx = np.arange(c0 + col, c1 + col, dtype=np.float32)[None, :] - np.float32(x)
        cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        if irregularity > 0:
            theta = np.arctan2(v, u)
            q /= 1 + irregularity * (0.6 * np.cos(2 * theta + phase) + 0.4 * np.cos(3 * theta + 2 * phase))
        alpha = (np.clip((1 - q) * b, 0, 1) * 0.9)[..., None]
        colour = _NUCLEUS * darkness * texture[r0:r1, c0:c1, None]
        patch = image[r0:r1, c0:c1]
        patch += (colour - patch) * alpha


def render_tile(layout: SlideLayout, row: int, col: int, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 RGB of the level-0 region whose top-left pixel is (row, col); a function of position."""
    rows = np.arange(row, row + height)
    cols = np.arange(col, col + width)
    tissue = np.zeros((height, width), np.float32)
    for blob in layout.tissue:
        tissue = np.maximum(tissue, blob.alpha(row, col, height, width))
    # one 64-bit hash per pixel, split into three 16-bit uniforms: per-channel pixel noise
    bits = (_hash_uniform(layout.seed, _KEY_NOISE, rows[:, None], cols[None, :]) * 2.0**48).astype(np.uint64)
    noise = np.stack([(bits >> np.uint64(16 * k)) & np.uint64(0xFFFF) for k in range(3)], axis=-1)
    noise = noise.astype(np.float32) / 65536

    image = np.broadcast_to(_BACKGROUND, (height, width, 3)).copy()
    if tissue.any():
        coarse = _value_noise(layout.seed, _KEY_STROMA_COARSE, rows, cols, 96)
        fine = _value_noise(layout.seed, _KEY_STROMA_FINE, rows, cols, 6)
        stroma = _STROMA * (0.93 + 0.14 * coarse[..., None]) + 22 * (fine[..., None] - 0.5)
        image += (stroma - _BACKGROUND) * tissue[..., None]
        glands = _glands(layout, row, col, height, width)
        _paint_glands(image, tissue, glands, row, col)
        nuclei = np.concatenate([_nuclei(layout, row, col, height, width), _epithelial_nuclei(layout, glands)])
        _paint_nuclei(image, 0.85 + 0.3 * noise[..., 0], nuclei, row, col)
    image += 10 * (noise - 0.5)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
