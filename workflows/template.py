"""Groupwise template construction as a resumable Dask workflow.

::

    STORE/template/iteration-K/pairs.zarr         that iteration's cohort store: the subjects and
                                                  the current template ingested, one pair per
                                                  subject (subject -> template), fields and metrics
    STORE/template/iteration-K/template.nii.gz    the template it produced (+ template_labels.nii.gz,
                                                  and both as Zarr arrays in template.zarr)
    STORE/template/iteration-K/stats.json         written last: the iteration is complete
    STORE/template/template.nii.gz                the final template (+ template_labels.nii.gz)
    STORE/zarr.json, STORE/<metric>               per-iteration statistics, dimension ``iteration``
                                                  (``xarray.open_zarr(STORE)``)

Iteration 0 aligns every subject to a reference (``initial`` or the subject closest to the cohort's
mean geometry) with a linear method and averages them. Each later iteration registers every
subject to the current template (the same per-pair tasks, store and resume as the other
workflows), averages the warped intensities weighted by each subject's coverage (not divided by
N), moves the average towards the mean shape through the inverse of ``step`` times the mean field
(ANTs' shape update), sharpens it (unsharp mask) and, when the subjects have labels, votes a
template label map. A killed run resumes at the last complete iteration, and inside an iteration
at the subjects not yet registered.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import zarr

from pipeline.ingest import ingest
from pipeline.manifest import Subject
from pipeline.pairs import Pair
from pipeline.runner import RunSummary, run_pairs
from pipeline.store import read_field
from pipeline.zarrio import write_image_array
from regcore import Image, InputError, read_image, write_image
from regcore.evaluation import mean_dice
from regcore.template import (coverage_mean, mean_gradient_magnitude, mean_warp_norm, ncc_value, shape_update,
                              unsharp_mask, vote_labels, warp_to_template)

__all__ = ["build_template", "TemplateResult", "IterationStats", "choose_reference", "TemplateWorkflow", "TEMPLATE"]

log = logging.getLogger(__name__)

TEMPLATE_KEY = "template"
STAT_NAMES = ("mean_warp_norm_mm", "mean_ncc_to_template", "mean_dice_to_template", "sharpness", "seconds",
              "pairs_submitted")


@dataclass
class IterationStats:
    """What one iteration did (also ``stats.json`` in its folder)."""

    iteration: int
    method: str
    mean_warp_norm_mm: float        # mean |mean field| over the covered voxels, before the step
    mean_ncc_to_template: float     # warped subjects vs the averaged template (its brain mask)
    mean_dice_to_template: float    # the voted template labels vs each registered subject's labels
    sharpness: float                # mean gradient magnitude of the template inside its mask
    seconds: float
    pairs_submitted: int
    failed: list[str] = field(default_factory=list)


@dataclass
class TemplateResult:
    """The template (and its labels), its file paths, and every iteration's statistics."""

    template: Image
    labels: Image | None
    path: Path
    iterations: list[IterationStats]


def choose_reference(images: Sequence[Image]) -> int:
    """The index of the image closest to the cohort's mean geometry (world centre and extent, mm)."""
    feats = np.array([np.concatenate([im.grid.center(), np.abs(im.grid.direction_matrix @ im.grid.extent())])
                      for im in images])
    return int(np.argmin(np.linalg.norm(feats - feats.mean(0), axis=1)))


def _iteration_dir(store: Path, k: int) -> Path:
    return store / "template" / f"iteration-{k}"


def _complete(store: Path, k: int) -> bool:
    return (_iteration_dir(store, k) / "stats.json").exists()


def _write_stats_arrays(store: Path, stats: list[IterationStats]) -> None:
    """Per-iteration statistics as root arrays with an ``iteration`` dimension (driver only)."""
    root = zarr.open_group(str(store), mode="a", zarr_format=3)
    n = len(stats)
    root.create_array("iteration", shape=(n,), dtype="int32", dimension_names=["iteration"], overwrite=True)[...] = \
        np.array([s.iteration for s in stats], dtype="int32")
    for name in STAT_NAMES:
        arr = root.create_array(name, shape=(n,), dtype="float64", dimension_names=["iteration"], fill_value=np.nan,
                                overwrite=True)
        arr[...] = np.array([float(getattr(s, name)) for s in stats])
    root.attrs.update({"kind": "template", "methods": [s.method for s in stats]})


def build_template(
    subjects: Sequence[Subject],
    store: str | Path,
    client: Any,
    *,
    iterations: int = 3,
    method: str = "affine+syn",
    linear_method: str = "affine",
    initial: str | Path | None = None,
    step: float = 0.25,
    sharpen: float = 0.5,
    min_warp_mm: float = 0.0,
    config: dict | str | Path | None = None,
    on_pair: Callable[[dict[str, int], dict[str, Any] | None], None] | None = None,
    gpu: bool = False,
    batch_size: int | str | None = 1,
) -> TemplateResult:
    """Build (or resume) a template of ``subjects`` in ``store`` on the cluster behind ``client``.

    Args:
        subjects: the cohort (from a manifest); labels, when every subject has them, give a
            template label map.
        store: the template store (a directory).
        iterations: deformable iterations after iteration 0 (the linear alignment).
        method: regcore method of the deformable iterations; ``linear_method`` that of iteration 0.
        initial: reference image of iteration 0 (default: the subject closest to the mean geometry).
        step: shape-update step (0, 0.25].
        sharpen: unsharp-mask amount applied to each deformable iteration's template (0: none).
        min_warp_mm: stop early once the mean-warp norm falls below this (mm).
        config: overrides for ``method``.
        on_pair: progress callback passed to each iteration's run.
        gpu, batch_size: as for :func:`pipeline.runner.run_pairs` (every subject shares the fixed
            template, so a GPU cluster can register them in batches).

    Returns:
        the final template, its labels, its path and every iteration's statistics (also stored).
    """
    if not subjects:
        raise InputError("template: no subjects")
    if not 0 < step <= 0.25:
        raise InputError(f"template: the shape-update step must be in (0, 0.25], got {step}")
    store = Path(store)
    images = [read_image(s.image) for s in subjects]
    label_maps = ([Image(lab.data.to(torch.int64), lab.grid) for lab in (read_image(s.labels, dtype=None) for s in subjects)]
                  if all(s.labels is not None for s in subjects) else None)  # read once, warped every iteration
    stats: list[IterationStats] = []
    template_path = labels_path = None
    k = 0
    while _complete(store, k):  # resume after the last complete iteration
        folder = _iteration_dir(store, k)
        stats.append(IterationStats(**json.loads((folder / "stats.json").read_text())))
        template_path = folder / "template.nii.gz"
        labels_path = folder / "template_labels.nii.gz" if (folder / "template_labels.nii.gz").exists() else None
        k += 1
    if k:
        log.info("template: iterations 0..%d complete, resuming at %d", k - 1, k)
    while k <= iterations:
        if k >= 2 and stats[-1].mean_warp_norm_mm < min_warp_mm:
            break
        t0 = time.perf_counter()
        folder = _iteration_dir(store, k)
        folder.mkdir(parents=True, exist_ok=True)
        if k == 0:
            if initial is not None:
                reference = Subject(TEMPLATE_KEY, Path(initial))
            else:
                ref = subjects[choose_reference(images)]
                reference = Subject(TEMPLATE_KEY, ref.image, labels=ref.labels)
            fixed, run_method, run_config = reference, linear_method, None
        else:
            fixed = Subject(TEMPLATE_KEY, template_path, labels=labels_path)  # type: ignore[arg-type]
            run_method, run_config = method, config
        summary, fields = _register_all(subjects, fixed, folder / "pairs.zarr", client, run_method, run_config, on_pair,
                                          gpu, batch_size)
        template_image = read_image(fixed.image)
        stat, template, labels = _update(images, label_maps, fields, template_image.grid, k, step, sharpen)
        stat.method, stat.pairs_submitted = run_method, len(summary.submitted)
        stat.failed = [subjects[i].key for i in range(len(subjects)) if fields[i] is None]
        template_path = write_image(template, folder / "template.nii.gz")
        labels_path = write_image(labels, folder / "template_labels.nii.gz", np.int32) if labels is not None else None
        _write_zarr(folder / "template.zarr", template, labels)
        stat.seconds = time.perf_counter() - t0
        (folder / "stats.json.tmp").write_text(json.dumps(stat.__dict__, indent=1))
        (folder / "stats.json.tmp").replace(folder / "stats.json")  # written last: the iteration is complete
        stats.append(stat)
        _write_stats_arrays(store, stats)
        log.info("template iteration %d: mean warp %.3f mm, NCC %.4f, %.1f s", k, stat.mean_warp_norm_mm,
                 stat.mean_ncc_to_template, stat.seconds)
        k += 1
    assert template_path is not None
    final = store / "template" / "template.nii.gz"
    shutil.copyfile(template_path, final)
    final_labels = None
    if labels_path is not None:
        shutil.copyfile(labels_path, store / "template" / "template_labels.nii.gz")
        final_labels = read_image(labels_path, dtype=None)
    _write_stats_arrays(store, stats)
    return TemplateResult(read_image(final), final_labels, final, stats)


def _write_zarr(path: Path, template: Image, labels: Image | None) -> None:
    """The iteration's template (and labels) as chunked Zarr with its geometry (as ingest writes
    images), for Zarr and xarray readers."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    write_image_array(group, "template", template)
    if labels is not None:
        write_image_array(group, "labels", labels, dtype="int32")


def _register_all(subjects: Sequence[Subject], fixed: Subject, pairs_store: Path, client: Any, method: str,
                  config: Any, on_pair: Any, gpu: bool = False,
                  batch_size: int | str | None = 1) -> tuple[RunSummary, list[torch.Tensor | None]]:
    """Every subject -> ``fixed`` in one iteration's store (resumable); the fields (None: failed)."""
    report = ingest([fixed, *subjects], pairs_store, client)
    if any(r["key"] == TEMPLATE_KEY and r["status"] == "failed" for r in report.results):
        raise InputError(f"template image {str(fixed.image)!r}: {report.failed[0]['error']}")
    pairs = [Pair(f"{s.key}--to--{TEMPLATE_KEY}", TEMPLATE_KEY, s.key) for s in subjects]
    summary = run_pairs(client, pairs_store, pairs, method, config, progress=on_pair, performance_report=False,
                        gpu=gpu, batch_size=batch_size)
    status = zarr.open_group(str(pairs_store), mode="r", zarr_format=3)["status"]
    fields: list[torch.Tensor | None] = []
    for i in range(len(subjects)):
        fields.append(read_field(pairs_store, i).data if str(status[i]) == "complete" else None)
    if all(f is None for f in fields):
        raise InputError(f"template: every registration failed in {str(pairs_store)!r}: "
                         f"{next(iter(summary.errors.values()), '')}")
    return summary, fields


def _update(images: Sequence[Image], label_maps: Sequence[Image] | None, fields: Sequence[torch.Tensor | None],
            grid: Any, k: int, step: float, sharpen: float) -> tuple[IterationStats, Image, Image | None]:
    """Average the warped subjects (coverage-weighted), update the shape, sharpen, vote labels."""
    warped, coverages, warped_labels, used = [], [], [], []
    for i, (img, u) in enumerate(zip(images, fields)):
        if u is None:
            continue
        w, c = warp_to_template(img, u, grid)
        warped.append(w)
        coverages.append(c)
        used.append(u)
        if label_maps is not None:
            warped_labels.append(warp_to_template(label_maps[i], u, grid, mode="nearest")[0])
    mean, total = coverage_mean(warped, coverages)
    mask = (total > 0.5 * len(warped)).float()
    head = mask * (mean > 0.1 * float(mean.max())).float()  # where the subjects agree there is tissue
    ncc = float(np.mean([ncc_value(w, mean, head * (c > 0.5)) for w, c in zip(warped, coverages)]))
    mean_field = torch.stack([u.float() for u in used]).mean(0)
    norm = mean_warp_norm(mean_field, mask)
    template = Image(mean, grid)
    labels = Image(vote_labels(warped_labels, coverages), grid) if label_maps is not None else None
    voted = labels
    if k > 0:
        template = shape_update(template, mean_field, step)
        template = unsharp_mask(template, 1.0, sharpen)
        if labels is not None:
            labels = shape_update(Image(labels.data.double(), grid), mean_field, step, mode="nearest")
            labels = Image(labels.data.round().to(torch.int32), grid)
    dice = float("nan")
    if labels is not None:  # the voted label map against each registered subject's labels, where it sees
        dice = float(np.nanmean([mean_dice(voted.data * (c > 0.5), lab * (c > 0.5))
                                 for lab, c in zip(warped_labels, coverages)]))
    stat = IterationStats(iteration=k, method="", mean_warp_norm_mm=norm, mean_ncc_to_template=ncc,
                          mean_dice_to_template=dice, sharpness=mean_gradient_magnitude(template, head),
                          seconds=0.0, pairs_submitted=0)
    return stat, template, labels


@dataclass(frozen=True)
class TemplateWorkflow:
    """The template workflow as an object, beside the pair workflows of :mod:`workflows`: its
    pairing rule (every subject to the current template), its method, and its post-step (the
    template update: coverage-weighted mean, shape update, sharpening, label vote), repeated."""

    name: str = "template"
    pairs: str = "each subject -> the current template"
    method: str = "affine+syn"
    linear_method: str = "affine"
    post_step: str = "template update"

    def run(self, subjects: Sequence[Subject], store: str | Path, client: Any, *, iterations: int = 3,
            method: str | None = None, **options: Any) -> TemplateResult:
        """:func:`build_template` with this workflow's methods (``options`` as there)."""
        return build_template(subjects, store, client, iterations=iterations, method=method or self.method,
                              linear_method=options.pop("linear_method", self.linear_method), **options)


TEMPLATE = TemplateWorkflow()
