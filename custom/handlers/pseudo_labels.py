"""Teacher pseudo-label cache: written at the start of stage 2 and after every role swap, read back by name."""

from __future__ import annotations

import copy
import csv
import itertools
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer
from monai.utils import IgniteInfo, min_version, optional_import
from PIL import Image

from custom.checkpoints import load_weights
from custom.distributed import barrier, rank, unwrap_network, world_size
from custom.engines.distillation_trainer import DistillationEvents
from custom.handlers.epoch_weights import SNAPSHOT_PREFIX, epoch_weight_files
from custom.metrics.calibration import CALIBRATION_GRID, calibrated_threshold, false_positive_curve, fp_area_at
from custom.networks import MeanEnsemble
from custom.transforms import pseudo_label_path

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["PseudoLabelHandler", "MANIFEST_NAME", "MANIFEST_FIELDS"]

MANIFEST_NAME = "manifest.csv"
MANIFEST_FIELDS = ("name", "image", "label", "png", "nifti", "round", "epoch", "mean_prob")
FP_CURVE_KEY = "_fp_curve"


class PseudoLabelHandler:
    """
    Run the trainer's teacher over the training images and cache its fused maps on disk
    (bundle/docs/method.md, pseudo-labels), on ``Events.STARTED`` and on ``DistillationEvents.TEACHER_CHANGED`` (after a
    role swap, once the new teacher is final on every rank, whatever the order of the trainer's handlers).

    Per image ``name`` it writes ``output_dir/name.nii.gz`` (float32 probabilities, array axes (row, col) as in the
    network's tensors: MONAI's ``NibabelReader`` and :class:`custom.transforms.LoadPseudoLabeld` read it back unchanged,
    viewers that take NIfTI axis 0 as x show it transposed) and ``output_dir/name.png`` (uint8, probability x 255, for
    viewing), plus ``manifest.csv`` with columns ``MANIFEST_FIELDS`` (``round`` counts swaps; ``epoch`` is the
    trainer's). Files are overwritten in place, so the training transforms always read the current teacher's maps.

    Negative images keep the teacher's map on disk (useful to see false positives); the all-zero target that
    method.md prescribes for them is applied by ``DistillationLoss`` from the image label, in one place, so the cached
    and the teacher-forward paths train identically.

    With ``torch.distributed`` initialised, every rank writes the maps of its shard of ``data_loader``: give it a
    ``monai.data.DistributedSampler(dataset, even_divisible=False, shuffle=False)``, so the shards are disjoint and
    cover the data. Rank 0 gathers the rows, restores the loader's order (that sampler deals index ``i`` to rank
    ``i % world_size``) and writes ``manifest.csv``; all ranks then wait, so none trains on maps another rank is still
    writing. An image written by two ranks (a padded or unsharded loader) is refused.
    A resumed run writes its restored teacher's maps: ``custom.engines.run_stage`` loads the stage checkpoint
    before the trainer starts.

    Args:
        data_loader: the training images without random augmentation, batches with ``image``, ``label`` and
            ``name`` (the image path is taken from the image's MONAI metadata when present).
        output_dir: folder of the cache; created if missing.
        inferer: how the teacher runs on a batch, default ``SimpleInferer()``.
        name_key: batch key of the image names.
        label_key: batch key of the image-level labels.
        fp_budget: mean false-positive area on the training negatives the calibrated threshold allows, in (0, 1);
            None leaves the targets at the teacher's 0.5.
        loss: the stage-2 loss whose ``target_threshold`` a calibration sets; needed with ``fp_budget``.
        snapshot_dir: folder of the stage-1 teacher's last epochs' weights (``SNAPSHOT_PREFIX``, written by an
            ``EpochWeightsSaver`` with ``keep_last``).
        snapshots: with 2 or more, the first round's maps are the mean of the teacher's last ``snapshots`` stage-1
            epochs (:class:`custom.networks.MeanEnsemble`) instead of the selected teacher's; later rounds come
            from the swapped-in teacher alone. Fewer files than asked: the ones found, with a warning; none: the
            teacher, with a warning.
    """

    def __init__(
        self,
        data_loader: Iterable,
        output_dir: str | os.PathLike,
        inferer: Inferer | None = None,
        name_key: str = "name",
        label_key: str = "label",
        fp_budget: float | None = None,
        loss: Any = None,
        snapshot_dir: str | os.PathLike | None = None,
        snapshots: int = 1,
    ) -> None:
        if snapshots < 1:
            raise ValueError(f"snapshots must be at least 1, got {snapshots}.")
        if snapshots > 1 and snapshot_dir is None:
            raise ValueError(f"snapshots {snapshots} needs the snapshot_dir holding the stage-1 teacher's epochs.")
        if fp_budget is not None:
            if not 0.0 < fp_budget < 1.0:
                raise ValueError(f"fp_budget must lie in (0, 1) or be None, got {fp_budget}.")
            if not hasattr(loss, "target_threshold"):
                raise ValueError("fp_budget needs the stage-2 loss (with a target_threshold attribute) as loss=.")
        self.fp_budget = fp_budget
        self.loss = loss
        self.threshold: float | None = None
        self.calibrations: list[dict[str, Any]] = []  # one per round: threshold and its evidence (rank 0)
        self.data_loader = data_loader
        self.output_dir = os.fspath(output_dir)
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.name_key = name_key
        self.label_key = label_key
        self.snapshot_dir = snapshot_dir
        self.snapshots = snapshots
        self.sources: list[dict[str, Any]] = []  # one per round: which network wrote the maps
        self.round = 0
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        """Write the cache before the first iteration and after every role swap."""
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(DistillationEvents.TEACHER_CHANGED, self.on_swap)

    def on_swap(self, engine: Engine) -> None:
        """A new teacher: next round of pseudo-labels."""
        self.round += 1
        self(engine)

    def __call__(self, engine: Engine) -> None:
        """Regenerate the cache from ``engine.teacher``: each rank writes its shard, rank 0 the manifest, all wait."""
        rows = self.write_maps(self.source(engine.teacher), engine.state.device, engine.state.epoch)
        shards: list[Any] = [rows]
        if world_size() > 1:
            shards = [None] * world_size()
            dist.gather_object(rows, shards if rank() == 0 else None, dst=0)
        if rank() == 0:
            ordered = [row for group in itertools.zip_longest(*shards) for row in group if row is not None]
            _check_written_once(ordered)
            self.write_manifest(ordered)
            self.logger.info(
                f"pseudo-labels round {self.round}: {len(ordered)} maps written by {world_size()} rank(s) to "
                f"{self.output_dir} ({', '.join(str(len(s)) for s in shards)} per rank)"
            )
            if self.fp_budget is not None:
                self.threshold = self._calibrate(ordered)
        if self.fp_budget is not None:
            self._share_threshold()
        barrier()

    def source(self, teacher: torch.nn.Module) -> torch.nn.Module:
        """The network whose maps this round writes: the teacher, or in the first round with ``snapshots`` the mean
        of its last stage-1 epochs; recorded in :attr:`sources`."""
        files = epoch_weight_files(self.snapshot_dir, SNAPSHOT_PREFIX) if self.snapshots > 1 else []
        files = files[-self.snapshots:] if self.round == 0 else []
        if self.round == 0 and self.snapshots > 1 and len(files) < self.snapshots:
            self.logger.warning(
                f"pseudo-labels round 0: {self.snapshots} stage-1 snapshots asked (teacher_snapshots), "
                f"{len(files)} found in {self.snapshot_dir}; "
                + ("using them" if files else "using the teacher alone")
            )
        epochs = [int(f.stem.rsplit("=", 1)[1]) for f in files]
        label = f"mean of the stage-1 teacher's epochs {epochs}" if files else "teacher"
        self.sources = [s for s in self.sources if s["round"] != self.round] + [{"round": self.round, "maps": label}]
        if not files:
            return teacher
        self.logger.info(f"pseudo-labels round 0: the {label} ({len(files)} snapshots of {self.snapshot_dir})")
        base = unwrap_network(teacher)
        device = next(base.parameters()).device
        return MeanEnsemble([load_weights(copy.deepcopy(base), f) for f in files]).to(device)

    def _calibrate(self, rows: list[dict[str, Any]]) -> float:
        """The round's calibrated threshold from the negatives' false-positive curves, logged with its evidence."""
        curves = [row[FP_CURVE_KEY] for row in rows if row["label"] == 0]
        if not curves:
            raise ValueError(
                f"fp_budget {self.fp_budget} calibrates on the training negatives, but none of the {len(rows)} "
                "training images is negative; set pseudo_fp_budget to null."
            )
        mean_curve = np.mean(curves, axis=0)
        threshold = calibrated_threshold(mean_curve, self.fp_budget)
        if mean_curve[-1] > self.fp_budget:
            self.logger.warning(
                f"pseudo-labels round {self.round}: the teacher calls {mean_curve[-1]:.4f} of the training negatives "
                f"even at {CALIBRATION_GRID[-1]:.2f}, above the budget {self.fp_budget}; using {threshold:.2f}."
            )
        fp_at_threshold = fp_area_at(mean_curve, threshold)
        self.logger.info(
            f"pseudo-labels round {self.round}: target threshold {threshold:.2f} calibrated on {len(curves)} training "
            f"negatives (their false-positive area {mean_curve[0]:.4f} at 0.50, {fp_at_threshold:.4f} at "
            f"{threshold:.2f}; budget {self.fp_budget})"
        )
        self.calibrations = [c for c in self.calibrations if c["round"] != self.round]  # a resumed round: redone
        self.calibrations.append({
            "round": self.round, "threshold": threshold, "fp_budget": self.fp_budget, "n_negatives": len(curves),
            "fp_area_at_0.5": float(mean_curve[0]), "fp_area_at_threshold": fp_at_threshold,
        })
        return threshold

    def _share_threshold(self) -> None:
        """Every rank takes rank 0's threshold and hands it to the loss."""
        if world_size() > 1:
            box = [self.threshold]
            dist.broadcast_object_list(box, src=0)
            self.threshold = box[0]
        self.loss.target_threshold = self.threshold

    def write(self, teacher: torch.nn.Module, device: torch.device | str, epoch: int = 0) -> list[dict[str, Any]]:
        """Run ``teacher`` (eval, no grad) over the data, write the maps and the manifest; return its rows."""
        rows = self.write_maps(teacher, device, epoch)
        self.write_manifest(rows)
        return rows

    def write_maps(self, teacher: torch.nn.Module, device: torch.device | str, epoch: int = 0) -> list[dict[str, Any]]:
        """Write the teacher's map of every image of ``data_loader``; return their manifest rows (a sharded loader
        gives a shard, whose rows :meth:`write_manifest` can list once gathered)."""
        os.makedirs(self.output_dir, exist_ok=True)
        teacher.eval()
        rows = []
        with torch.no_grad():
            for batch in self.data_loader:
                fused = self.inferer(batch["image"].to(device), teacher)[:, -1].float().cpu().numpy()
                names, paths, labels = self._describe(batch)
                for prob, name, path, label in zip(fused, names, paths, labels):
                    rows.append(self._write_one(prob, name, path, label, epoch))
        return rows

    def write_manifest(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """``manifest.csv``: one row per map, columns ``MANIFEST_FIELDS``."""
        with open(os.path.join(self.output_dir, MANIFEST_NAME), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def _describe(self, batch: Mapping) -> tuple[list[str], list[str], list[int]]:
        """Names, image paths ('' when the batch carries no MONAI metadata) and labels of a batch."""
        names = list(batch[self.name_key])
        image = batch["image"]
        paths = image.meta.get("filename_or_obj", []) if isinstance(image, MetaTensor) else []
        paths = [str(p) for p in paths] if len(paths) == len(names) else [""] * len(names)
        labels = [int(v) for v in torch.as_tensor(batch[self.label_key]).reshape(-1).tolist()]
        return names, paths, labels

    def _write_one(self, prob: np.ndarray, name: str, image_path: str, label: int, epoch: int) -> dict[str, Any]:
        """Write one (row, col) probability map as NIfTI and PNG; return its manifest row."""
        nifti = pseudo_label_path(self.output_dir, name, ".nii.gz")
        png = pseudo_label_path(self.output_dir, name, ".png")
        nib.save(nib.Nifti1Image(prob.astype(np.float32), np.eye(4)), nifti)
        Image.fromarray(np.round(np.clip(prob, 0.0, 1.0) * 255).astype(np.uint8)).save(png)
        return {
            "name": name,
            "image": image_path,
            "label": label,
            "png": png,
            "nifti": nifti,
            "round": self.round,
            "epoch": epoch,
            "mean_prob": float(prob.mean()),
            FP_CURVE_KEY: false_positive_curve(prob) if label == 0 and self.fp_budget is not None else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """The pseudo-label round and the calibrations so far, so that a resumed run keeps counting."""
        return {"round": self.round, "calibrations": list(self.calibrations), "sources": list(self.sources)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.round = int(state_dict["round"])
        self.calibrations = list(state_dict.get("calibrations", []))
        self.sources = list(state_dict.get("sources", []))


def _check_written_once(rows: list[dict[str, Any]]) -> None:
    """Refuse a gathered manifest in which an image appears twice: its shards overlapped."""
    repeated = sorted(name for name, count in Counter(row["name"] for row in rows).items() if count > 1)
    if repeated:
        raise RuntimeError(
            f"pseudo-labels of {repeated[:5]} were written by several ranks: give the pseudo-label loader a "
            "DistributedSampler(even_divisible=False, shuffle=False)."
        )
