"""The registration loop: objective + transform + torch optimiser + pyramid + stopping rules.

:func:`register` is the one-call entry point (``from regcore import register``). It never prints;
progress goes to an optional ``callback(event: dict)`` and to :mod:`logging`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .config import MethodConfig, StageConfig, config_hash
from .errors import InputError, RegistrationError
from .greedy import optimize_symmetric_level
from .grid import Grid
from .image import Image
from .intensity import apply_window, intensity_window
from .io import read_image
from .levels import POINTWISE_MEASURES, DeformableLevel, LinearLevel
from .methods import method_config
from .objective import Objective
from .optimize import OUT_OF_VIEW_LOSS, Callback, LevelRecord, optimize_level
from .pyramid import downsample, gaussian_smooth
from .regularizers import jacobian_determinant
from .sampling import inside_mask, linear_coords, warp_linear
from .transforms.base import Transform, compose
from .transforms.deformable import DeformableTransform, DenseDisplacement
from .transforms.init import initialize_linear
from .transforms.linear import LinearTransform, Translation, matrix_displacement
from .transforms.registry import build_transform
from .transforms.svf import StationaryVelocityField
from .transforms.syn import SymmetricDiffeomorphism

__all__ = ["register", "register_pairs", "RegistrationResult", "RegistrationFailure", "LevelRecord", "check_pair",
           "linear_displacement"]

log = logging.getLogger(__name__)


@dataclass
class RegistrationResult:
    """The outcome of :func:`register`.

    Attributes:
        transform: the fitted linear map (fixed world -> moving world, mm); a zero translation
            when the method has no linear stage.
        deformable: the fitted deformable transform (``None`` for linear methods). The full map is
            ``T(x) = transform(x + u(x))`` with ``u = deformable.displacement(grid)``.
        warped: moving resampled on the fixed grid (original intensities), ``(1, *fixed.shape)``.
        displacement: ``T(x) - x`` on the fixed grid, ``(D, *fixed.shape)``, world mm, channels
            ``(x, y[, z])``: what an ITK ``DisplacementFieldTransform`` expects.
        jacobian: determinant of the Jacobian of ``T`` on the fixed grid (deformable methods).
        levels: per stage and pyramid level: losses per iteration, iterations, stop reason.
        seconds: wall time of the registration; for a pair of a batch, the batch's wall time
            divided by its number of pairs.
    """

    method: str
    config: MethodConfig
    config_hash: str
    transform: LinearTransform
    deformable: DeformableTransform | None
    warped: Image
    displacement: Image
    jacobian: Image | None
    levels: list[LevelRecord]
    seconds: float
    device: str

    ok = True

    @property
    def iterations(self) -> int:
        return sum(level.iterations for level in self.levels)

    @property
    def final_loss(self) -> float:
        for level in reversed(self.levels):
            if level.losses:
                return level.losses[-1]
        return math.nan

    def summary(self) -> dict[str, Any]:
        """JSON-ready record: method, full config, hash, losses per level, iterations, time, device."""
        out = {
            "method": self.method,
            "config": self.config.model_dump(mode="json"),
            "config_hash": self.config_hash,
            "levels": [asdict(level) for level in self.levels],
            "loss_per_level": [level.losses[-1] if level.losses else None for level in self.levels],
            "iterations": self.iterations,
            "seconds": self.seconds,
            "device": self.device,
            "transform": self.transform.describe(),
        }
        if self.deformable is not None:
            out["deformable"] = {"type": self.deformable.kind}
        if self.jacobian is not None:
            det = self.jacobian.data
            out["jacobian"] = {
                "min": float(det.min()),
                "max": float(det.max()),
                "fraction_nonpositive": float((det <= 0).double().mean()),
            }
        return out


def _as_image(value: Image | str | Path, name: str) -> Image:
    if isinstance(value, Image):
        return value
    if isinstance(value, (str, Path)):
        return read_image(value, scalar=True)
    raise InputError(f"{name}: expected an Image or a path, got {type(value).__name__}")


def check_pair(fixed: Image, moving: Image, fixed_name: str = "fixed", moving_name: str = "moving") -> None:
    """Validate a pair for registration; raise :class:`InputError` naming the culprit."""
    if fixed.ndim != moving.ndim:
        raise InputError(
            f"dimension mismatch: {fixed_name} is {fixed.ndim}D {fixed.grid.size}, "
            f"{moving_name} is {moving.ndim}D {moving.grid.size}"
        )
    for img, name in ((fixed, fixed_name), (moving, moving_name)):
        if img.channels != 1:
            raise InputError(f"{name}: has {img.channels} components per voxel; registration needs a scalar image")
        img.check_finite(name)
        if not bool((img.data != img.data.flatten()[0]).any()):
            raise InputError(f"{name}: image is constant (value {float(img.data.flatten()[0])}); nothing to register")


def _check_mask(mask: Image | None, ref: Image, name: str) -> Image | None:
    if mask is None:
        return None
    if not mask.grid.same_as(ref.grid, atol=1e-4):
        raise InputError(f"{name}: mask grid {mask.grid.size} does not match its image's grid {ref.grid.size}")
    if not bool((mask.data > 0).any()):
        raise InputError(f"{name}: mask is empty")
    return Image((mask.data > 0).to(ref.dtype), mask.grid)


def _make_transform(stage: StageConfig, fixed: Image) -> Transform:
    """The stage's transform on the fixed grid, from the registry and the stage's params."""
    return build_transform(stage.transform, fixed.grid, stage.transform_params)


@dataclass
class RegistrationFailure:
    """A pair of a batch that could not be registered (:func:`regcore.batch.register_batch`); the
    other pairs of the batch are unaffected.

    Attributes:
        index: position of the pair in the batch.
        method: the method's name.
        error: the exception (an :class:`~regcore.errors.InputError` for bad input, a
            :class:`~regcore.errors.RegistrationError` when the optimisation failed).
        traceback: the formatted traceback.
    """

    index: int
    method: str
    error: Exception
    traceback: str = ""

    ok = False

    @property
    def message(self) -> str:
        return str(self.error)


@dataclass
class _Pair:
    """One pair's state through the stages of a batched registration."""

    index: int
    name: str
    moving: Image  # original intensities, on the device
    mask: Image | None
    levels: Mapping[float, Image] | None
    cache: dict = field(default_factory=dict)
    linear: LinearTransform | None = None
    deformable: DeformableTransform | None = None
    records: list[LevelRecord] = field(default_factory=list)


def register(
    fixed: Image | str | Path,
    moving: Image | str | Path,
    method: str | dict | MethodConfig = "affine",
    *,
    config: dict | str | Path | None = None,
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
    fixed_levels: Mapping[float, Image] | None = None,
    moving_levels: Mapping[float, Image] | None = None,
    deterministic: bool = False,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (backward warping: the result samples moving on fixed's grid).

    Args:
        fixed, moving: images (or paths read through SimpleITK). They may differ in size, spacing
            and direction; they must overlap in world space after initialisation.
        method: a preset name (``rigid``, ``affine``, ...), a full config dict or a config.
        config: overrides (dict or YAML path) deep-merged over the preset.
        fixed_mask, moving_mask: binary masks on the images' grids restricting the similarity.
        device: where to compute; default the fixed image's device.
        callback: called with a dict for every iteration (``event="iteration"``: stage, level,
            factor, iteration, loss, terms) and at the end of each level (``event="level"``).
        fixed_levels, moving_levels: precomputed downsampled copies of the raw images by factor
            (e.g. read from an ingested Zarr pyramid, made with :func:`regcore.pyramid.downsample`).
            A pyramid level whose factor is present *and* whose grid is the one the level needs
            reads it (normalised with the full image's intensity window) instead of smoothing and
            resampling again; other levels are computed as usual.
        deterministic: reproducible results on CUDA, run to run (see :func:`register_pairs`).

    Raises:
        InputError: invalid images, masks or configuration, or no overlap in world space.
        RegistrationError: the optimisation produced a non-finite loss.
    """
    (result,) = register_pairs(fixed, [moving], method, config=config, fixed_mask=fixed_mask, moving_masks=[moving_mask],
                               device=device, callback=callback, fixed_levels=fixed_levels, moving_levels=[moving_levels],
                               deterministic=deterministic)
    if isinstance(result, RegistrationFailure):
        raise result.error
    return result


def _is_pair_failure(exc: BaseException) -> bool:
    """Errors that concern one pair (its input, its optimisation), not the machine."""
    return isinstance(exc, (InputError, RegistrationError))


def register_pairs(
    fixed: Image | str | Path,
    movings: Sequence[Image | str | Path],
    method: str | dict | MethodConfig,
    *,
    config: dict | str | Path | None = None,
    fixed_mask: Image | None = None,
    moving_masks: Sequence[Image | None] | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
    fixed_levels: Mapping[float, Image] | None = None,
    moving_levels: Sequence[Mapping[float, Image] | None] | None = None,
    deterministic: bool = False,
) -> list[RegistrationResult | RegistrationFailure]:
    """Register every moving image to ``fixed``, as one batch (see :mod:`regcore.batch`, whose
    :func:`~regcore.batch.register_batch` is the public entry point; :func:`register` is a batch
    of one). Stage by stage and level by level, the pairs whose fixed pyramid schedule is the same
    (all of them unless the moving images' voxel sizes split a level) are optimised together.

    ``deterministic`` makes CUDA runs reproducible: the warps of the moving image, which are
    differentiated with respect to their coordinates (every linear stage, and the deformable
    stages fitted by a torch optimiser), interpolate by :func:`regcore.sampling.interpolate_linear`
    instead of ``grid_sample``, whose backward accumulates with atomics, and torch's deterministic
    algorithms are switched on for the call (``index_add_`` in the B-spline and kernel transforms
    then sorts instead of using atomics; set ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` for cuBLAS). The
    SyN stage needs nothing: it never differentiates a ``grid_sample``. Not covered: the SVF's
    scaling and squaring differentiates ``grid_sample`` through the velocity itself (torch warns).
    On CPU results are reproducible anyway; the option only changes the linear stages' speed.

    Returns one :class:`RegistrationResult` or :class:`RegistrationFailure` per moving image.
    Errors that concern every pair (an invalid config, a bad fixed mask) are raised, as are
    infrastructure errors (out of memory).
    """
    with _deterministic_algorithms(deterministic):
        return _register_pairs(fixed, movings, method, config, fixed_mask, moving_masks, device, callback,
                               fixed_levels, moving_levels, deterministic)


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """torch's deterministic algorithms (warn only) for the duration, the previous setting restored."""
    if not enabled:
        yield
        return
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _register_pairs(fixed, movings, method, config, fixed_mask, moving_masks, device, callback, fixed_levels,
                    moving_levels, deterministic) -> list[RegistrationResult | RegistrationFailure]:
    t0 = time.perf_counter()
    n = len(movings)
    masks = list(moving_masks) if moving_masks is not None else [None] * n
    pyramids = list(moving_levels) if moving_levels is not None else [None] * n
    if len(masks) != n or len(pyramids) != n:
        raise InputError(f"{n} moving images but {len(masks)} moving masks and {len(pyramids)} moving level sets")
    fixed_name = str(fixed) if isinstance(fixed, (str, Path)) else "fixed"
    fixed = _as_image(fixed, "fixed")
    cfg = method_config(method, config)
    dev = torch.device(device) if device is not None else fixed.device
    out: dict[int, RegistrationResult | RegistrationFailure] = {}

    def fail(index: int, exc: Exception) -> None:
        if n > 1:  # one pair: register() raises it, nothing to log here
            log.warning("pair %d of the batch failed: %s", index, exc)
        out[index] = RegistrationFailure(index, cfg.name, exc, "".join(traceback.format_exception(exc)))

    pairs: list[_Pair] = []
    for b, moving in enumerate(movings):
        name = str(moving) if isinstance(moving, (str, Path)) else ("moving" if n == 1 else f"moving {b}")
        try:
            moving = _as_image(moving, name)
            check_pair(fixed, moving, fixed_name, name)
            moving = moving.to(dev, torch.float32)
            mask = _check_mask(masks[b].to(dev) if masks[b] is not None else None, moving, f"{name} mask")
            pairs.append(_Pair(b, name, moving, mask, pyramids[b]))
        except Exception as exc:
            if not _is_pair_failure(exc):
                raise
            fail(b, exc)
    fixed = fixed.to(dev, torch.float32)
    fmask = _check_mask(fixed_mask.to(dev) if fixed_mask is not None else None, fixed, "fixed mask")
    fcache: dict = {}  # the fixed image's normalised copies and pyramid levels, shared by stages and pairs
    for s, stage in enumerate(cfg.stages):
        objective = Objective.from_config(stage, cfg.seed).to(dev)
        live = []
        for pair in (p for p in pairs if p.index not in out):
            try:
                _start_stage(pair, stage, fixed, fmask, fixed_name)
                live.append(pair)
            except Exception as exc:
                if not _is_pair_failure(exc):
                    raise
                fail(pair.index, exc)
        schedules: dict[tuple, list[_Pair]] = {}
        for pair in live:
            levels = stage.pyramid.level_factors(fixed.grid.spacing, pair.moving.grid.spacing)
            schedules.setdefault(tuple((f, i) for f, _, i in levels), []).append(pair)
        for group in schedules.values():
            _run_stage(s, stage, objective, fixed, fmask, fcache, fixed_levels, group, cfg.seed, callback, fail,
                       deterministic)
    seconds = (time.perf_counter() - t0) / max(1, n)
    for pair in pairs:
        if pair.index in out:
            continue
        try:
            out[pair.index] = _result(pair, cfg, fixed, dev, seconds)
        except Exception as exc:
            if not _is_pair_failure(exc):
                raise
            fail(pair.index, exc)
    return [out[b] for b in range(n)]


def _start_stage(pair: _Pair, stage: StageConfig, fixed: Image, fmask: Image | None, fixed_name: str) -> None:
    """A pair's transform for ``stage``, initialised (raises :class:`InputError` on no overlap)."""
    dev = fixed.device
    if stage.deformable:
        if pair.linear is None:  # a deformable first stage: centre the images with a translation
            pair.linear = Translation(fixed.ndim).to(dev)
            initialize_linear(pair.linear, fixed, pair.moving, "none" if stage.init == "previous" else stage.init,
                              fmask, pair.mask)
            _check_overlap(fixed, pair.moving, pair.linear, fixed_name, pair.name)
        pair.deformable = _make_transform(stage, fixed).to(dev)
        return
    previous = pair.linear
    pair.linear = _make_transform(stage, fixed).to(dev)
    if stage.init == "previous" and previous is not None:
        pair.linear.set_center(previous.center.cpu())
        pair.linear.set_matrix(previous.matrix().detach().cpu())
    else:
        initialize_linear(pair.linear, fixed, pair.moving, "geometry" if stage.init == "previous" else stage.init,
                          fmask, pair.mask)
    _check_overlap(fixed, pair.moving, pair.linear, fixed_name, pair.name)


def _run_stage(s: int, stage: StageConfig, objective: Objective, fixed: Image, fmask: Image | None, fcache: dict,
               fixed_levels: Mapping[float, Image] | None, group: list[_Pair], seed: int,
               callback: Callback | None, fail: Callable[[int, Exception], None], deterministic: bool) -> None:
    """Every pyramid level of ``stage`` for a group of pairs with one fixed schedule."""
    fwin, fixed_n = _normalized(fcache, "fixed", fixed, stage.normalize)
    dev = fixed.device
    schedules = [stage.pyramid.level_factors(fixed.grid.spacing, p.moving.grid.spacing) for p in group]
    for lvl in range(len(schedules[0])):
        factor, _, max_iter = schedules[0][lvl]
        fixed_l = _cached(fcache, ("fixed", stage.normalize, factor, stage.pyramid.min_size),
                          lambda: _level_image(fixed_n, fixed_levels, fwin, factor, stage, dev))
        fmask_l = downsample(fmask, factor, stage.pyramid.min_size) if fmask is not None else None
        movings, mmasks = [], []
        for pair, schedule in zip(group, schedules):
            mfactor = schedule[lvl][1]
            mwin, moving_n = _normalized(pair.cache, "moving", pair.moving, stage.normalize)
            movings.append(_cached(pair.cache, ("moving", stage.normalize, mfactor, stage.pyramid.min_size),
                                   lambda: _level_image(moving_n, pair.levels, mwin, mfactor, stage, dev)))
            mmasks.append(downsample(pair.mask, mfactor, stage.pyramid.min_size) if pair.mask is not None else None)
        records = [LevelRecord(s, stage.transform, factor, ()) for _ in group]
        relay = None if callback is None else _relay(callback, [p.index for p in group])
        failures = _run_level(stage, objective, group, fixed_l, fmask_l, movings, mmasks, max_iter, lvl, seed, relay,
                              records, deterministic)
        for pair, record in zip(group, records):
            pair.records.append(record)
        for j, exc in failures.items():
            fail(group[j].index, exc)
        keep = [j for j in range(len(group)) if j not in failures]
        group = [group[j] for j in keep]
        schedules = [schedules[j] for j in keep]
        if not group:
            return


def _relay(callback: Callback, indices: list[int]) -> Callback:
    """``callback`` with each event's ``pair`` (a position in the level's group) turned into the
    pair's index in the batch."""
    return lambda event: callback({**event, "pair": indices[event.get("pair", 0)]})


def _run_level(stage: StageConfig, objective: Objective, group: list[_Pair], fixed: Image, fmask: Image | None,
               movings: list[Image], mmasks: list[Image | None], max_iter: int, level: int, seed: int,
               callback: Callback | None, records: list[LevelRecord], deterministic: bool) -> dict[int, Exception]:
    """One pyramid level of one stage for the pairs of ``group``; ``{position: error}`` of those that failed."""
    if not stage.deformable:
        return _linear_level(records, stage, [p.linear for p in group], objective, fixed, movings, fmask, mmasks,
                             max_iter, level, seed, callback, deterministic)
    if isinstance(group[0].deformable, SymmetricDiffeomorphism):
        return optimize_symmetric_level(records, stage, [p.deformable for p in group], objective, fixed, movings,
                                        fmask, mmasks, [p.linear.matrix().detach() for p in group], max_iter, level,
                                        callback)
    failures: dict[int, Exception] = {}
    for j, pair in enumerate(group):  # other deformable transforms: one pair at a time
        try:
            failed = _deformable_level(records[j], stage, pair.deformable, pair.linear.matrix().detach(), objective,
                                       fixed, movings[j], fmask, mmasks[j], max_iter, level,
                                       None if callback is None else (lambda e, _j=j: callback({**e, "pair": _j})),
                                       deterministic)
        except Exception as exc:
            if not _is_pair_failure(exc):
                raise
            failed = {0: exc}
        if failed:
            failures[j] = failed[0]
    return failures


def _result(pair: _Pair, cfg: MethodConfig, fixed: Image, dev: torch.device, seconds: float) -> RegistrationResult:
    """A registered pair's warped image, total displacement and Jacobian on the fixed grid."""
    linear, deformable = pair.linear, pair.deformable
    assert linear is not None
    with torch.no_grad():
        matrix = linear.matrix()
        mode = cfg.stages[-1].interpolation
        if deformable is None:
            warped, _ = warp_linear(pair.moving, fixed.grid, matrix, mode=mode)
            displacement, jacobian = linear_displacement(matrix, fixed), None
        else:
            warped, displacement = _compose(deformable, matrix, fixed, pair.moving, mode)
            direction = torch.as_tensor(fixed.grid.direction_matrix, dtype=displacement.dtype, device=dev)
            det = jacobian_determinant(displacement.data[None], spacing=fixed.grid.spacing, direction=direction)
            jacobian = Image(det, fixed.grid)
    return RegistrationResult(
        method=cfg.name,
        config=cfg,
        config_hash=config_hash(cfg),
        transform=linear,
        deformable=deformable,
        warped=Image(warped, fixed.grid),
        displacement=displacement,
        jacobian=jacobian,
        levels=pair.records,
        seconds=seconds,
        device=str(dev),
    )


def _cached(cache: dict, key: tuple, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by ``make()`` the first time."""
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _normalized(cache: dict, which: str, image: Image, mode: str):
    """``(intensity window, normalised image)`` of ``image`` for a stage's ``normalize`` mode,
    computed once per registration."""
    def make():
        window = intensity_window(image.data, mode)
        return window, image.with_data(apply_window(image.data, window, mode))

    return _cached(cache, (which, mode, "window"), make)


def _level_image(normalized: Image, levels: Mapping[float, Image] | None, window, factor: float,
                 stage: StageConfig, device: torch.device) -> Image:
    """The pyramid level ``factor`` of an image: precomputed when available and on the right grid."""
    if factor != 1 and levels:
        pre = levels.get(float(factor))
        if pre is not None and pre.grid == normalized.grid.downsample(factor, stage.pyramid.min_size):
            data = pre.data.to(device, torch.float32)
            return Image(apply_window(data, window, stage.normalize), pre.grid)
    return downsample(normalized, factor, stage.pyramid.min_size)


def _compose(deformable: DeformableTransform, matrix: torch.Tensor, fixed: Image, moving: Image, mode: str) -> tuple[torch.Tensor, Image]:
    """Warped moving and the total displacement ``M (x + u(x)) - x`` on the fixed grid."""
    data = DeformableLevel(fixed, moving, None, None, mode, matrix)
    u = deformable.displacement(fixed.grid)
    _, warped, _ = data.warp(u)
    return warped[0], Image(compose(matrix, u, data.points), fixed.grid)


def linear_displacement(matrix: torch.Tensor, fixed: Image) -> Image:
    """``u(x) = M x - x`` (mm) at every fixed voxel, as a ``D``-channel image on the fixed grid
    (:func:`regcore.transforms.linear.matrix_displacement`)."""
    return Image(matrix_displacement(matrix, fixed.grid), fixed.grid)


def _check_overlap(fixed: Image, moving: Image, transform: LinearTransform, fixed_name: str, moving_name: str) -> None:
    coarse = fixed.grid.downsample(max(1.0, max(fixed.grid.size) / 32))
    with torch.no_grad():
        inside = inside_mask(linear_coords(coarse, moving.grid, transform.matrix(), torch.float32))
    if not bool(inside.any()):
        raise InputError(
            f"no overlap in world space between {fixed_name} and {moving_name} under the initial transform "
            f"(fixed corners {fixed.grid.corners().min(0).round(1).tolist()}..{fixed.grid.corners().max(0).round(1).tolist()} mm, "
            f"moving {moving.grid.corners().min(0).round(1).tolist()}..{moving.grid.corners().max(0).round(1).tolist()} mm); "
            "check the headers or initialise with 'geometry' or 'moments'"
        )


def _linear_level(
    records: list[LevelRecord], stage: StageConfig, transforms: Sequence[LinearTransform], objective: Objective,
    fixed: Image, movings: Sequence[Image], fixed_mask: Image | None, moving_masks: Sequence[Image | None],
    max_iter: int, level: int, seed: int, callback: Callback | None, deterministic: bool = False,
) -> dict[int, Exception]:
    """A linear level for a batch of pairs sharing the fixed image (one batched warp and
    similarity per iteration); ``{position: error}`` of the pairs that failed."""
    pointwise = all(term.measure in POINTWISE_MEASURES for term in stage.objective)
    data = LinearLevel(fixed, movings, fixed_mask, moving_masks, stage.interpolation,
                       stage.max_voxels if pointwise else None, seed + level, objective.overlap_only, deterministic)
    for record in records:
        record.size, record.voxels = fixed.grid.size, data.voxels

    def evaluate(active: list[int]) -> tuple[torch.Tensor, list[dict[str, float]]]:
        matrices = torch.stack([transforms[b].matrix() for b in active])
        fixed_t, warped, mask = data.warp(matrices, active)
        inside = (mask.detach().flatten(1).amax(1) > 0).tolist()
        if all(inside):
            return objective.similarity_per_pair(fixed_t, warped, mask, fixed.grid.spacing)
        # a line search probing far away: a high, flat loss sends it back
        losses = matrices.sum((1, 2)).to(warped.dtype) * 0 + OUT_OF_VIEW_LOSS
        parts: list[dict[str, float]] = [{} for _ in active]
        ok = [j for j, v in enumerate(inside) if v]
        if ok:
            sub, sub_parts = objective.similarity_per_pair(fixed_t, warped[ok], mask[ok], fixed.grid.spacing)
            losses = losses.index_put((torch.as_tensor(ok, device=losses.device),), sub)
            for j, value in zip(ok, sub_parts):
                parts[j] = value
        return losses, parts

    params = [[p for p in t.parameters() if p.requires_grad] for t in transforms]
    return optimize_level(records, stage, params, evaluate, max_iter, level, callback)


def _smoother(sigma_mm: float, grid: Grid) -> Callable[[torch.Tensor], torch.Tensor]:
    """Gaussian smoothing (sigma in mm) of a field ``(D, *grid.shape)``."""
    sigma = [sigma_mm / sp for sp in reversed(grid.spacing)]  # tensor dim order
    return lambda field: gaussian_smooth(field, sigma)


def _field_parameter(transform: DeformableTransform) -> tuple[torch.nn.Parameter, Grid]:
    """The grid-shaped parameter demons smoothing acts on, and its grid."""
    if isinstance(transform, StationaryVelocityField):
        return transform.velocity, transform.velocity_grid
    if isinstance(transform, DenseDisplacement):
        return transform.field, transform.field_grid
    raise InputError(f"demons smoothing needs a 'dense' or 'svf' transform, not {transform.kind!r}")


def _deformable_level(
    record: LevelRecord, stage: StageConfig, transform: DeformableTransform, matrix: torch.Tensor,
    objective: Objective, fixed: Image, moving: Image, fixed_mask: Image | None, moving_mask: Image | None,
    max_iter: int, level: int, callback: Callback | None, deterministic: bool = False,
) -> dict[int, Exception]:
    """A level of a deformable transform fitted by a torch optimiser, for one pair."""
    record.size = fixed.grid.size
    grid = fixed.grid
    transform.set_level(grid)
    data = DeformableLevel(fixed, moving, fixed_mask, moving_mask, stage.interpolation, matrix, deterministic)
    record.voxels = data.voxels
    reg_grid = transform.regularization_grid(grid)

    def evaluate() -> tuple[torch.Tensor, dict[str, float]]:
        u = transform.displacement(grid)
        fixed_t, warped, mask = data.warp(u)
        if not bool((mask > 0).any()):
            return u.sum() * 0 + OUT_OF_VIEW_LOSS, {}
        loss, parts = objective.similarity(fixed_t, warped, mask, grid.spacing)
        if objective.has_regularizers:
            reg, reg_parts = objective.regularization(transform.regularization_field(reg_grid), reg_grid)
            loss = loss + reg
            parts.update(reg_parts)
        return loss, parts

    params = [p for p in transform.parameters() if p.requires_grad]
    hooks: list = []
    after_step: Callable[[int], None] | None = None
    smoothing = stage.smoothing
    if smoothing is not None and (smoothing.update_sigma_mm > 0 or smoothing.field_sigma_mm > 0):
        field, field_grid = _field_parameter(transform)
        if smoothing.update_sigma_mm > 0:
            hooks.append(field.register_hook(_smoother(smoothing.update_sigma_mm, field_grid)))
        if smoothing.field_sigma_mm > 0:
            smooth_field = _smoother(smoothing.field_sigma_mm, field_grid)

            def after_step(_: int) -> None:
                with torch.no_grad():
                    field.copy_(smooth_field(field))

    def evaluate_one(active: list[int]) -> tuple[torch.Tensor, list[dict[str, float]]]:
        loss, parts = evaluate()
        return loss.reshape(1), [parts]

    try:
        return optimize_level([record], stage, [params], evaluate_one, max_iter, level, callback, after_step)
    finally:
        for hook in hooks:
            hook.remove()
