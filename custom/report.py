"""What a finished training leaves for its user: the final model, test metrics against the MIL teacher and the
baselines, training curves and overlays (``metrics.json``, ``training_curves.png``, ``overlays.png``)."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle.utils import ID_SEP_KEY
from monai.engines import SupervisedEvaluator
from monai.handlers import MetricLogger

from custom import tables
from custom.checkpoints import RECORD_KEY, WEIGHTS_KEY, TrainingRecord
from custom.engines.evaluation import negatives_false_positive_curve, selection_evaluator, selection_key
from custom.handlers.pseudo_labels import PseudoLabelHandler
from custom.handlers.role_swap import RoleSwapHandler
from custom.metrics import METRIC_KEYS, evaluate_baselines
from custom.metrics.calibration import fp_area_at
from custom.metrics.segmentation import summarise_scores
from custom.writers.figures import plot_curves, plot_overlays

__all__ = [
    "evaluate_network",
    "subset_metrics",
    "dataset_baselines",
    "select_final_model",
    "operating_threshold",
    "curves_from_loggers",
    "TrainingReport",
    "resolved_knobs",
    "resolved_modules",
    "write_eval_metrics",
    "format_table",
]

logger = logging.getLogger(__name__)

EVAL_PREFIX = "eval_"
# where selection_evaluator(selection_metric="mask_f1") publishes the mask metrics of its prefix
MASK_PREFIX = EVAL_PREFIX + "mask_"


def evaluate_network(
    network: torch.nn.Module,
    data_loader: Any,
    device: str | torch.device,
    amp: bool = False,
    smooth_sigma: float | None = 3.0,
    threshold: float = 0.5,
    subsets: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``eval_metrics.json`` fields of one network on a loader of image + mask batches, scored by the bundle's
    one evaluator factory (``custom.engines.selection_evaluator`` with the mask metrics, as ``evaluate.json``);
    with ``subsets`` also ``"subsets"``: the same fields per subset of the images (see ``subset_metrics``)."""
    evaluator = selection_evaluator(
        network, data_loader, device, selection_metric="mask_f1", prefix=EVAL_PREFIX, smooth_sigma=smooth_sigma,
        threshold=threshold, amp=amp,
    )
    evaluator.run()
    metrics: dict[str, Any] = {key: _plain(evaluator.state.metrics[MASK_PREFIX + key]) for key in METRIC_KEYS}
    if subsets:
        names = [str(item["name"]) for item in getattr(data_loader.dataset, "data", [])]
        metrics["subsets"] = subset_metrics(evaluator.state.metric_details[MASK_PREFIX + "f1"], names, subsets)
    return metrics


def subset_metrics(rows: torch.Tensor, names: Sequence[str], subsets: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Metrics per subset of images: each image joins the first subset whose regex is found in its name.

    Negatives of different origins (normal mucosa, benign lesions that look like tumour) behave very differently,
    so one ``f1_neg`` over all of them hides what a user needs to know. Subsets without an image are left out.
    """
    if len(names) != len(rows):
        raise ValueError(f"{len(rows)} score rows but {len(names)} image names; evaluate the loader's dataset in order")
    patterns = {subset: re.compile(pattern) for subset, pattern in subsets.items()}
    members: dict[str, list[int]] = {subset: [] for subset in subsets}
    for index, name in enumerate(names):
        subset = next((s for s, pattern in patterns.items() if pattern.search(name)), None)
        if subset is not None:
            members[subset].append(index)
    empty = [f"{subset} ({patterns[subset].pattern!r})" for subset, indices in members.items() if not indices]
    if empty:
        logger.info("test subsets without an image, left out: %s", ", ".join(empty))
    return {
        subset: {k: _plain(v) for k, v in summarise_scores(rows[indices]).items()}
        for subset, indices in members.items() if indices
    }


def write_eval_metrics(
    evaluator: SupervisedEvaluator,
    output_dir: str | Path,
    display: Sequence[Mapping],
    prefix: str = "test_",
    subsets: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """After ``evaluator.run()``: ``eval_metrics.json`` (its fields, and ``subsets``: the same per test subset) and
    ``eval_baselines.json`` (the floors on the same images, from ``display``: items with mask and label) in
    ``output_dir``; print both as a table."""
    metrics: dict[str, Any] = {key: _plain(evaluator.state.metrics[prefix + key]) for key in METRIC_KEYS}
    baselines = dataset_baselines(display, **kwargs)
    rows = {"model": dict(metrics), **{f"baseline: {k}": v for k, v in baselines.items()}}
    if subsets:
        names = [str(item["name"]) for item in getattr(display, "data", display)]
        metrics["subsets"] = subset_metrics(evaluator.state.metric_details[prefix + "f1"], names, subsets)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
    (output_dir / "eval_baselines.json").write_text(json.dumps(baselines, indent=2))
    print(format_table(rows))
    if len(metrics.get("subsets", {})) > 1:
        per = {f"model: {name}": m for name, m in metrics["subsets"].items()}
        print(
            "By subset of the test images (test_subsets):\n"
            + format_table(per, ("n_pos", "n_neg", "f1_pos", "f1_neg", "fp_area"))
        )
    print(f"Written: {output_dir / 'eval_metrics.json'}, {output_dir / 'eval_baselines.json'}")
    return metrics


def dataset_baselines(dataset: Sequence[Mapping], **kwargs: Any) -> dict[str, dict[str, float | int]]:
    """The oracle-label and all-background floors on the same images, through the same metric code.

    Each image's label is read from its mask, as the evaluators do: a tile of a tumour slide without tumour pixels
    is a negative image here.
    """
    masks = [np.asarray(item["mask"])[0] for item in dataset]
    return {name: {k: _plain(v) for k, v in scores.items()}
            for name, scores in evaluate_baselines(masks, **kwargs).items()}


def select_final_model(
    teacher: torch.nn.Module, role_swap: RoleSwapHandler
) -> tuple[dict[str, torch.Tensor], str, float | None]:
    """The weights to ship (``model.pt``): the best validated student when its validation score is higher than the
    current teacher's, else the teacher (the stage-1 MIL teacher when no swap happened, a former student otherwise).

    No tie goes to the student: on the mosaics the student that came within 0.03 of its teacher's validation score
    was the worse of the two on test in 3 of 3 seeds (bundle/docs/README.md, Results)."""
    best, best_score = role_swap.best_student_state, role_swap.best_student_score
    if best is not None and (role_swap.teacher_score is None or best_score > role_swap.teacher_score):
        return copy.deepcopy(best), f"{role_swap.keep} student", best_score
    return copy.deepcopy(teacher.state_dict()), _teacher_origin(role_swap), role_swap.teacher_score


def is_student(source: str) -> bool:
    """Whether a model source (:func:`select_final_model`) is the kept student (best or last: ``checkpoint_policy``)."""
    return source in ("best student", "last student")


def distilled_model(
    teacher: torch.nn.Module, role_swap: RoleSwapHandler
) -> tuple[dict[str, torch.Tensor], str, float | None]:
    """The distillation's result, reported as ``student`` even when it does not beat the stage-1 teacher: the best
    validated student, or, once a swap has made a student the teacher, the better of the two on validation."""
    if role_swap.best_student_state is None or (
        _swapped(role_swap) and not role_swap.best_student_score > role_swap.teacher_score
    ):
        return copy.deepcopy(teacher.state_dict()), _teacher_origin(role_swap), role_swap.teacher_score
    return copy.deepcopy(role_swap.best_student_state), f"{role_swap.keep} student", role_swap.best_student_score


def _swapped(role_swap: RoleSwapHandler) -> bool:
    """Whether any role swap has happened, i.e. the teacher is a former student."""
    return any(r["swapped"] for r in role_swap.rounds)


def _teacher_origin(role_swap: RoleSwapHandler) -> str:
    """Where the current teacher's weights come from, for the report."""
    return "teacher (a former student, after swaps)" if _swapped(role_swap) else "stage-1 MIL teacher"


def curves_from_loggers(
    loggers: Mapping[str, tuple[MetricLogger, int]], metrics: Sequence[str] = ("val_area_contrast",)
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per-epoch training loss and validation ``metrics`` of each stage; a stage's epochs continue the previous ones."""
    loss: dict[str, list[tuple[float, float]]] = {}
    scores: dict[str, list[tuple[float, float]]] = {}
    offset = 0.0
    for stage, (metric_logger, epoch_length) in loggers.items():
        per_epoch: dict[int, list[float]] = {}
        for iteration, value in metric_logger.loss:
            per_epoch.setdefault(math.ceil(iteration / epoch_length), []).append(float(value))
        loss[stage] = [(offset + e, float(np.mean(v))) for e, v in sorted(per_epoch.items())]
        for name in metrics:
            points = metric_logger.metrics.get(name, [])
            scores[f"{stage} {name}"] = [(offset + it / epoch_length, float(v)) for it, v in points]
        offset += _stage_epochs(metric_logger, epoch_length)
    return {"training loss (epoch mean)": loss, "validation": scores}


def _stage_epochs(metric_logger: MetricLogger, epoch_length: int) -> int:
    """Epochs a stage has logged (its loss is recorded per iteration)."""
    return max((math.ceil(iteration / epoch_length) for iteration, _ in metric_logger.loss), default=0)


def format_table(results: Mapping[str, Mapping[str, float | int]], keys: Sequence[str] = METRIC_KEYS) -> str:
    """A plain-text table, one row per model or baseline, for the log and the terminal."""
    columns = [tables.Column("", 28, "<"), *(tables.Column(k, 11, ">", ".4f") for k in keys)]
    return tables.format_table(columns, [[name, *(metrics[k] for k in keys)] for name, metrics in results.items()])


class TrainingReport:
    """The end of a training run as one configured object: ``write()`` saves ``model.pt`` (with its record, and
    ``model_metadata.json`` beside it), evaluates the stage-1 teacher and the distilled student on the test split and
    writes ``metrics.json``, ``training_curves.png`` and ``overlays.png``.

    Args:
        output_dir: folder of the report files.
        ckpt_dir: folder of ``model.pt``.
        stage1_teacher: a network holding the stage-1 best teacher's weights (the teacher changes in stage 2).
        teacher: stage 2's teacher at the end of the run.
        student: stage 2's student; loaded with the distilled model before it is evaluated.
        role_swap: stage 2's ``RoleSwapHandler`` (its rounds and best student).
        pseudo_labels: stage 2's ``PseudoLabelHandler``; its target calibrations (``pseudo_fp_budget``), one per
            pseudo-label round, go into ``metrics.json`` as ``target_calibration`` (empty when it is off), and which
            network wrote each round's maps as ``pseudo_label_sources`` (``teacher_snapshots``).
        test_loader: batches of the test split (image, mask, label, name), normalised.
        test_display: the same items in [0, 1], index-aligned with ``test_loader.dataset``.
        stage1_history, stage2_history: the stages' ``MetricLogger`` (training curves).
        stage1_epoch_length, stage2_epoch_length: iterations per epoch of each stage.
        config: the configuration to record in ``metrics.json``: a bundle config passes ``$__local_refs``, MONAI's
            map of every resolved config id to its value, read when the report is written (after training, so every
            knob the run used is resolved); ``metrics.json`` gets its knobs (see :func:`resolved_knobs`) as
            ``"config"`` and the class of every network and loss as ``"modules"``. A plain knob mapping works too.
        device: where the networks run.
        selection_metric: the validation score that selected the models (``custom.engines.selection_key``).
        swap_margin: the role swap's margin, reported with the selection.
        test_subsets: subset name -> regex on the test image names, for the per-subset table.
        amp, smooth_sigma, threshold: as in validation.
        validation_loader: batches of the validation split (image, image label), unsharded; needed with
            ``threshold_fp_budget``.
        threshold_fp_budget: mask-free operating thresholds: each model (stage-1 teacher, distilled student,
            ``model.pt``) is scored on test, and ``model.pt`` recorded, at the lowest threshold from ``threshold``
            (at least 0.5) up at which its mean false-positive area on the validation negatives is at most this budget
            (``custom.metrics.calibration``); None scores every model at ``threshold``.
        n_overlays: test images in ``overlays.png``.
        record: the training's :class:`custom.checkpoints.TrainingRecord`: ``model.pt`` is then
            ``{"network": weights, "record": ...}`` (what the network is, how it was trained and chosen) and
            ``model_metadata.json`` (the bundle's metadata with that record, for ``ckpt_export --meta_file``) is
            written beside it; without one, ``model.pt`` is the plain state dict.
    """

    def __init__(
        self,
        *,
        output_dir: str | Path,
        ckpt_dir: str | Path,
        stage1_teacher: torch.nn.Module,
        teacher: torch.nn.Module,
        student: torch.nn.Module,
        role_swap: RoleSwapHandler,
        test_loader: Any,
        test_display: Sequence[Mapping],
        stage1_history: MetricLogger,
        stage1_epoch_length: int,
        stage2_history: MetricLogger,
        stage2_epoch_length: int,
        config: Mapping[str, Any],
        device: str | torch.device,
        selection_metric: str = "area_contrast",
        swap_margin: float = 0.0,
        test_subsets: Mapping[str, str] | None = None,
        amp: bool = False,
        smooth_sigma: float | None = 3.0,
        threshold: float = 0.5,
        n_overlays: int = 6,
        record: TrainingRecord | None = None,
        pseudo_labels: PseudoLabelHandler | None = None,
        validation_loader: Any = None,
        threshold_fp_budget: float | None = None,
    ) -> None:
        if threshold_fp_budget is not None:
            if not 0.0 < threshold_fp_budget < 1.0:
                raise ValueError(f"threshold_fp_budget must lie in (0, 1) or be None, got {threshold_fp_budget}")
            if validation_loader is None:
                raise ValueError("threshold_fp_budget calibrates on the validation negatives: give validation_loader")
        self.output_dir, self.ckpt_dir = Path(output_dir), Path(ckpt_dir)
        self.stage1_teacher, self.teacher, self.student, self.role_swap = stage1_teacher, teacher, student, role_swap
        self.test_loader, self.test_display, self.device = test_loader, test_display, device
        self.loggers = {
            "stage 1": (stage1_history, stage1_epoch_length), "stage 2": (stage2_history, stage2_epoch_length)
        }
        self.config = config
        self.selection_key = selection_key(selection_metric)
        self.swap_margin, self.test_subsets = swap_margin, test_subsets
        self.amp, self.smooth_sigma, self.threshold, self.n_overlays = amp, smooth_sigma, threshold, n_overlays
        self.record = record
        self.pseudo_labels = pseudo_labels
        self.validation_loader, self.threshold_fp_budget = validation_loader, threshold_fp_budget

    def save_model(
        self, weights: dict[str, torch.Tensor], source: str, val_score: float | None,
        operating: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``model.pt`` (and, with a record, ``model_metadata.json``); return its path. ``operating`` (its
        calibrated threshold, see :meth:`operating_thresholds`) replaces the record's ``threshold``, so inference and
        evaluation call tumour where the calibration put it."""
        path = self.ckpt_dir / "model.pt"
        if self.record is None:
            torch.save(weights, path)
            return path
        network = self.student if is_student(source) else self.teacher
        record = self.record.describe(
            weights=WEIGHTS_KEY, network=network, source=source, val_score=_plain(val_score),
            selection_metric=self.selection_key, **({"threshold_calibration": dict(operating)} if operating else {}),
        )
        if operating:
            record = {**record, "threshold": operating["threshold"]}
        torch.save({WEIGHTS_KEY: weights, RECORD_KEY: record}, path)
        metadata = self.record.model_metadata(record)
        (self.ckpt_dir / "model_metadata.json").write_text(json.dumps(metadata, indent=4))
        return path

    def operating_thresholds(self, source: str) -> dict[str, dict[str, Any]]:
        """The calibrated operating thresholds (:func:`operating_threshold`) of the stage-1 teacher, the distilled
        student (loaded) and ``model.pt`` (from ``source``), or {} when ``threshold_fp_budget`` is None. ``model.pt``
        takes the student's or the stage-1 teacher's entry when it holds their weights; only a former student that
        became the teacher is calibrated on its own. A threshold outside the budget even at 0.99 is logged."""
        if self.threshold_fp_budget is None:
            return {}
        networks = {"teacher": self.stage1_teacher, "student": self.student}
        if not is_student(source) and source != "stage-1 MIL teacher":
            networks["model.pt"] = self.teacher
        out = {}
        for name, network in networks.items():
            out[name] = operating_threshold(
                network, self.validation_loader, self.device, self.threshold_fp_budget, self.threshold,
                self.smooth_sigma, self.amp,
            )
            if not out[name]["within_budget"]:
                logger.warning(f"{name}: false-positive area {out[name]['fp_area']:.4f} on the validation negatives "
                               f"even at {out[name]['threshold']:.2f}, above threshold_fp_budget "
                               f"{self.threshold_fp_budget}")
        out.setdefault("model.pt", out["student"] if is_student(source) else out["teacher"])
        return out

    def write(self) -> dict[str, Any]:
        """Save ``model.pt`` (the final model), evaluate the distilled model and the stage-1 teacher on the test split
        once (``model.pt`` is one of the two), write ``metrics.json``, ``training_curves.png`` and ``overlays.png``
        and print the comparison; return what ``metrics.json`` holds. Call it once training has finished, so that
        every knob the run used is resolved in ``config``."""
        output_dir, ckpt_dir, loggers = self.output_dir, self.ckpt_dir, self.loggers
        stage1_teacher, teacher, student, role_swap = self.stage1_teacher, self.teacher, self.student, self.role_swap
        test_loader, test_display, device, amp = self.test_loader, self.test_display, self.device, self.amp
        selection_key, swap_margin, test_subsets = self.selection_key, self.swap_margin, self.test_subsets
        smooth_sigma, threshold, n_overlays = self.smooth_sigma, self.threshold, self.n_overlays
        config, modules = resolved_knobs(self.config), resolved_modules(self.config)
        output_dir.mkdir(parents=True, exist_ok=True)
        weights, source, val_score = select_final_model(teacher, role_swap)
        distilled, distilled_source, distilled_score = distilled_model(teacher, role_swap)
        student.load_state_dict(distilled)
        operating = self.operating_thresholds(source)
        self.save_model(weights, source, val_score, operating.get("model.pt"))
        results = {
            name: evaluate_network(
                network, test_loader, device, amp, subsets=test_subsets, smooth_sigma=smooth_sigma,
                threshold=operating[name]["threshold"] if operating else threshold,
            )
            for name, network in (("teacher", stage1_teacher), ("student", student))
        }
        subsets = {name: result.pop("subsets", {}) for name, result in results.items()}
        baselines = dataset_baselines(test_display, smooth_sigma=smooth_sigma, threshold=threshold)
        report = {
            **results,
            "baselines": baselines,
            "subsets": subsets,
            "selection": {"metric": selection_key, "swap_margin": swap_margin},
            "student_model": {"source": distilled_source, "val_score": distilled_score},
            "final_model": {"source": source, "val_score": val_score, "path": str(ckpt_dir / "model.pt")},
            "rounds": role_swap.rounds,
            "target_calibration": self.pseudo_labels.calibrations if self.pseudo_labels is not None else [],
            "pseudo_label_sources": self.pseudo_labels.sources if self.pseudo_labels is not None else [],
            "operating_thresholds": operating,
            "config": config,
            "modules": modules,
        }
        (output_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=_plain))
        stage1_epochs = _stage_epochs(*loggers["stage 1"]) if "stage 1" in loggers else 0
        swaps = [stage1_epochs + r["epoch"] for r in role_swap.rounds if r["swapped"]]
        plot_curves(
            curves_from_loggers(loggers, (selection_key,)), output_dir / "training_curves.png", marks=swaps,
            title="stage 1 (MIL teacher) then stage 2 (distillation); dashed lines: role swaps",
        )
        _overlays(
            stage1_teacher, student, test_loader.dataset, test_display, output_dir / "overlays.png", device, n_overlays,
            threshold,
        )
        table = format_table(
            {"MIL teacher (stage 1)": results["teacher"], "distilled student": results["student"],
             **{f"baseline: {k}": v for k, v in baselines.items()}}
        )
        logger.info("test split results\n" + table)
        print(
            f"\nTest split ({results['student']['n_pos']} positive, "
            f"{results['student']['n_neg']} negative images):\n{table}"
        )
        if sum(1 for _ in subsets["student"]) > 1:
            rows = {f"{model}: {subset}": m for model, per in subsets.items() for subset, m in per.items()}
            print(
                "By subset of the test images (test_subsets):\n"
                + format_table(rows, ("n_pos", "n_neg", "f1_pos", "f1_neg", "fp_area"))
            )
        if operating:
            print(
                f"Operating thresholds (threshold_fp_budget {self.threshold_fp_budget}, on "
                f"{operating['teacher']['n_negatives']} validation negatives): "
                + ", ".join(f"{name} {o['threshold']:.2f} (false-positive area there {o['fp_area']:.4f}, at "
                            f"{threshold:.2f} {o['fp_area_at_threshold']:.4f})" for name, o in operating.items())
            )
        print(
            f"Selection by {selection_key} (swap margin {swap_margin}). Distilled student: {distilled_source}. "
            f"Outputs in {output_dir}; final model {ckpt_dir / 'model.pt'} ({source}, {selection_key} {val_score})"
        )
        return report


def operating_threshold(
    network: torch.nn.Module, validation_loader: Any, device: str | torch.device, fp_budget: float,
    threshold: float = 0.5, smooth_sigma: float | None = 3.0, amp: bool = False,
) -> dict[str, Any]:
    """The lowest threshold, from ``threshold`` (at least 0.5) up, at which ``network`` calls at most ``fp_budget``
    of the validation negatives' pixels, with its evidence (plain data for ``metrics.json`` and the record)."""
    curve = negatives_false_positive_curve(network, validation_loader, device, smooth_sigma, amp)
    chosen, fp_area = curve.threshold(fp_budget, lowest=threshold)
    return {
        "threshold": chosen, "fp_budget": fp_budget, "n_negatives": curve.count, "fp_area": fp_area,
        "fp_area_at_threshold": fp_area_at(curve.curve(), threshold), "within_budget": fp_area <= fp_budget,
    }


def resolved_knobs(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs among resolved config ids: every top-level id (no ``::`` or ``#``, not ``_meta_`` or another
    ``_``-prefixed id) whose value is plain data (None, bool, number, string, or lists and dicts of those; a
    ``torch.device`` as its string), sorted by name. Networks, loaders and other objects are left out."""
    knobs = {}
    for key, value in resolved.items():
        if not isinstance(key, str) or key.startswith("_") or ID_SEP_KEY in key or "#" in key:
            continue
        value = str(value) if isinstance(value, torch.device) else value
        if _is_plain(value):
            knobs[key] = _plain_copy(value)
    return dict(sorted(knobs.items()))


def resolved_modules(resolved: Mapping[str, Any]) -> dict[str, str]:
    """``id -> module.Class`` of every resolved config id whose value is a ``torch.nn.Module`` (networks, losses)."""
    return dict(sorted(
        (str(key), f"{type(value).__module__}.{type(value).__qualname__}")
        for key, value in resolved.items() if isinstance(value, torch.nn.Module)
    ))


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is JSON data all the way down."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _plain_copy(value: Any) -> Any:
    """A copy of plain data, tuples as lists, so the report does not hold the config's own containers."""
    if isinstance(value, (list, tuple)):
        return [_plain_copy(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain_copy(v) for k, v in value.items()}
    return value


def _overlays(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    dataset: Sequence[Mapping],
    display: Sequence[Mapping],
    path: Path,
    device: str | torch.device,
    n: int,
    threshold: float,
) -> None:
    """Overlays of truth, stage-1 teacher and final model on the first positive and negative test images.

    ``dataset`` gives the network inputs (preprocessed as in evaluation), ``display`` the same items in [0, 1].
    """
    labels = [int(item["label"]) for item in getattr(display, "data", display)]  # datalist labels: no image loaded
    positives = [i for i, label in enumerate(labels) if label == 1]
    negatives = [i for i, label in enumerate(labels) if label == 0]
    chosen = (positives[: n - n // 3] + negatives[: n // 3])[:n]
    if not chosen:
        return
    images, truth, maps_t, maps_s, names = [], [], [], [], []
    with torch.no_grad():
        for i in chosen:
            item = display[i]
            image = torch.as_tensor(dataset[i]["image"]).unsqueeze(0).to(device)
            maps_t.append(teacher.eval()(image)[0, -1].float().cpu().numpy())
            maps_s.append(student.eval()(image)[0, -1].float().cpu().numpy())
            images.append((np.asarray(item["image"]).transpose(1, 2, 0) * 255).round().astype(np.uint8))
            truth.append(np.asarray(item["mask"])[0])
            names.append(str(item["name"]))
    plot_overlays(images, {"truth": truth, "MIL teacher": maps_t, "distilled": maps_s}, path, names, threshold)


def _plain(value: Any) -> Any:
    """JSON-friendly numbers (tensors and numpy scalars to Python floats / ints, NaN kept as NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    return value
