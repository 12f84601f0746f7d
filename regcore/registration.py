"""The registration loop: objective + transform + torch optimiser + pyramid + stopping rules.

:func:`register` is the one-call entry point (``from regcore import register``). It never prints;
progress goes to an optional ``callback(event: dict)`` and to :mod:`logging`.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import MethodConfig, OptimizerConfig, StageConfig, config_hash
from .errors import InputError, RegistrationError
from .image import Image
from .intensity import normalize_intensity
from .io import read_image
from .losses import build_loss
from .methods import method_config
from .pyramid import downsample
from .sampling import inside_mask, linear_coords, linear_theta, sample_normalized, stratified_indices, warp_linear
from .transforms.init import initialize_linear
from .transforms.linear import LINEAR_TRANSFORMS, LinearTransform

__all__ = ["register", "RegistrationResult", "LevelRecord", "Objective", "build_optimizer", "check_pair"]

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]

#: Loss returned where the moving image does not overlap the fixed grid at all.
OUT_OF_VIEW_LOSS = 1e3

#: Measures that compare voxel by voxel, so they can be evaluated on a subset of fixed voxels.
POINTWISE_MEASURES = frozenset({"mse", "ncc", "mi", "nmi"})


class LinearLevel:
    """One pyramid level's fixed data, and the warping of moving onto it by a linear map.

    With ``max_voxels`` set and a larger fixed image, only a seeded stratified subset of fixed
    voxels is used (for pointwise measures); tensors are then ``(1, 1, [1,] M)``.
    """

    def __init__(self, fixed: Image, moving: Image, fixed_mask: Image | None, moving_mask: Image | None,
                 mode: str, max_voxels: int | None, seed: int) -> None:
        self.grid, self.moving, self.moving_mask, self.mode = fixed.grid, moving, moving_mask, mode
        d = fixed.ndim
        if max_voxels is not None and fixed.grid.numel > max_voxels:
            idx = stratified_indices(fixed.grid.numel, max_voxels, seed, fixed.device)
            index, rest = [], idx
            for size in reversed(fixed.grid.shape):  # unravel (z, y, x) order into (x, y, z) indices
                index.append(rest % size)
                rest = rest // size
            n = torch.as_tensor(fixed.grid.index_to_normalized(), device=fixed.device)
            self.points: torch.Tensor | None = torch.stack(index, -1).double() @ n[:d, :d].T + n[:d, d]
            shape = (1, 1, *([1] * (d - 1)), max_voxels)
            self.fixed = fixed.data.reshape(-1)[idx].reshape(shape)
            self.fixed_mask = None if fixed_mask is None else fixed_mask.data.reshape(-1)[idx].reshape(shape)
            self.voxels = max_voxels
        else:
            self.points = None
            self.fixed = fixed.batch()
            self.fixed_mask = None if fixed_mask is None else fixed_mask.batch()
            self.voxels = fixed.grid.numel

    def warp(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(fixed, warped moving, mask)`` batched alike for a fixed -> moving world matrix."""
        theta = linear_theta(self.grid, self.moving.grid, matrix)
        d = self.grid.ndim
        if self.points is None:
            coords = F.affine_grid(theta.to(self.fixed.dtype)[None], [1, 1, *self.grid.shape], align_corners=True)[0]
        else:
            coords = (self.points @ theta[:, :d].T + theta[:, d]).to(self.fixed.dtype)
        shape = self.fixed.shape
        warped = sample_normalized(self.moving.data, coords, self.mode).reshape(shape)
        mask = inside_mask(coords).reshape(shape)
        if self.moving_mask is not None:
            mask = mask * sample_normalized(self.moving_mask.data, coords.detach()).reshape(shape)
        if self.fixed_mask is not None:
            mask = mask * self.fixed_mask
        return self.fixed, warped, mask

_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "lbfgs": torch.optim.LBFGS,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


class Objective(nn.Module):
    """Weighted sum of similarity terms. ``forward`` returns ``(total, {name: value})``."""

    def __init__(self, terms: list[tuple[str, float, nn.Module]]) -> None:
        super().__init__()
        self.names = [n for n, _, _ in terms]
        self.weights = [float(w) for _, w, _ in terms]
        self.terms = nn.ModuleList([m for _, _, m in terms])
        self._takes_spacing = ["spacing" in inspect.signature(m.forward).parameters for m in self.terms]

    def forward(
        self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None, spacing: tuple[float, ...]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        total = fixed.new_zeros(())
        parts: dict[str, float] = {}
        for name, weight, term, takes_spacing in zip(self.names, self.weights, self.terms, self._takes_spacing):
            value = term(fixed, warped, mask, spacing=spacing) if takes_spacing else term(fixed, warped, mask)
            parts[name] = float(value.detach())
            total = total + weight * value
        return total, parts

    @classmethod
    def from_config(cls, stage: StageConfig, seed: int) -> "Objective":
        terms = []
        for term in stage.objective:
            params = dict(term.params)
            if term.measure in ("mi", "nmi"):
                params.setdefault("seed", seed)
            try:
                terms.append((term.measure, term.weight, build_loss(term.measure, **params)))
            except TypeError as exc:
                raise InputError(f"objective term {term.measure!r}: bad params {term.params} ({exc})") from exc
        return cls(terms)


def build_optimizer(config: OptimizerConfig, params) -> torch.optim.Optimizer:
    """A torch optimiser from its config (name, learning rate, extra constructor arguments)."""
    cls = _OPTIMIZERS[config.name]
    kwargs = dict(config.params)
    if config.name == "lbfgs":
        # torch's default max_eval (1.25 max_iter) leaves no line-search evaluations when one
        # LBFGS iteration is taken per step, as regcore's loop does
        kwargs.setdefault("max_eval", max(kwargs.get("max_iter", 20) * 5 // 4, 25))
    try:
        return cls(params, lr=config.lr, **kwargs)
    except TypeError as exc:
        raise InputError(f"optimizer {config.name!r}: bad params {config.params} ({exc})") from exc


@dataclass
class LevelRecord:
    """What happened at one pyramid level of one stage.

    ``losses[i]`` is the loss before iteration ``i``; the last entry is the loss at the level's
    final parameters (so ``len(losses) == iterations + 1``). ``evaluations`` counts objective
    evaluations (line searches make several per iteration).
    """

    stage: int
    transform: str
    factor: float
    size: tuple[int, ...]
    losses: list[float] = field(default_factory=list)
    iterations: int = 0
    evaluations: int = 0
    voxels: int = 0
    stop_reason: str = ""
    seconds: float = 0.0


@dataclass
class RegistrationResult:
    """The outcome of :func:`register`.

    Attributes:
        transform: the fitted transform (fixed world -> moving world, mm).
        warped: moving resampled on the fixed grid (original intensities), ``(1, *fixed.shape)``.
        displacement: ``u(x) = T(x) - x`` on the fixed grid, ``(D, *fixed.shape)``, world mm,
            channels ``(x, y[, z])``: what an ITK ``DisplacementFieldTransform`` expects.
        levels: per stage and pyramid level: losses per iteration, iterations, stop reason.
    """

    method: str
    config: MethodConfig
    config_hash: str
    transform: LinearTransform
    warped: Image
    displacement: Image
    levels: list[LevelRecord]
    seconds: float
    device: str

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
        return {
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


def _make_transform(stage: StageConfig, fixed: Image) -> LinearTransform:
    length = float(np.linalg.norm(fixed.grid.extent())) / 2 or 1.0
    return LINEAR_TRANSFORMS[stage.transform](fixed.ndim, length_scale=length)


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

    Raises:
        InputError: invalid images, masks or configuration, or no overlap in world space.
        RegistrationError: the optimisation produced a non-finite loss.
    """
    t0 = time.perf_counter()
    fixed_name = str(fixed) if isinstance(fixed, (str, Path)) else "fixed"
    moving_name = str(moving) if isinstance(moving, (str, Path)) else "moving"
    fixed, moving = _as_image(fixed, "fixed"), _as_image(moving, "moving")
    check_pair(fixed, moving, fixed_name, moving_name)
    cfg = method_config(method, config)
    dev = torch.device(device) if device is not None else fixed.device
    fixed = fixed.to(dev, torch.float32)
    moving_orig = moving.to(dev, torch.float32)
    fmask = _check_mask(fixed_mask.to(dev) if fixed_mask is not None else None, fixed, "fixed mask")
    mmask = _check_mask(moving_mask.to(dev) if moving_mask is not None else None, moving_orig, "moving mask")

    levels: list[LevelRecord] = []
    transform: LinearTransform | None = None
    for s, stage in enumerate(cfg.stages):
        previous = transform
        transform = _make_transform(stage, fixed).to(dev)
        if stage.init == "previous":
            if previous is None:
                initialize_linear(transform, fixed, moving_orig, "geometry", fmask, mmask)
            else:
                transform.set_center(previous.center.cpu())
                transform.set_matrix(previous.matrix().detach().cpu())
        else:
            initialize_linear(transform, fixed, moving_orig, stage.init, fmask, mmask)
        _check_overlap(fixed, moving_orig, transform, fixed_name, moving_name)
        fixed_n = fixed.with_data(normalize_intensity(fixed.data, stage.normalize, mask=None if fmask is None else fmask.data))
        moving_n = moving_orig.with_data(
            normalize_intensity(moving_orig.data, stage.normalize, mask=None if mmask is None else mmask.data)
        )
        objective = Objective.from_config(stage, cfg.seed).to(dev)
        for lvl, (factor, max_iter) in enumerate(zip(stage.pyramid.factors, stage.pyramid.iterations)):
            record = LevelRecord(s, stage.transform, factor, ())
            _run_level(
                record, stage, transform, objective,
                downsample(fixed_n, factor, stage.pyramid.min_size),
                downsample(moving_n, factor, stage.pyramid.min_size),
                downsample(fmask, factor, stage.pyramid.min_size) if fmask is not None else None,
                downsample(mmask, factor, stage.pyramid.min_size) if mmask is not None else None,
                max_iter, lvl, cfg.seed, callback,
            )
            levels.append(record)
    assert transform is not None
    with torch.no_grad():
        matrix = transform.matrix()
        warped, _ = warp_linear(moving_orig, fixed.grid, matrix, mode=cfg.stages[-1].interpolation)
        displacement = linear_displacement(matrix, fixed)
    return RegistrationResult(
        method=cfg.name,
        config=cfg,
        config_hash=config_hash(cfg),
        transform=transform,
        warped=Image(warped, fixed.grid),
        displacement=displacement,
        levels=levels,
        seconds=time.perf_counter() - t0,
        device=str(dev),
    )


def linear_displacement(matrix: torch.Tensor, fixed: Image) -> Image:
    """``u(x) = M x - x`` (mm) at every fixed voxel, as a ``D``-channel image on the fixed grid."""
    pts = fixed.grid.world_points(device=matrix.device, dtype=torch.float64)
    d = fixed.ndim
    mapped = pts @ matrix[:d, :d].T + matrix[:d, d]
    u = torch.movedim(mapped - pts, -1, 0).to(torch.float32)
    return Image(u, fixed.grid)


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


def _run_level(
    record: LevelRecord,
    stage: StageConfig,
    transform: LinearTransform,
    objective: Objective,
    fixed: Image,
    moving: Image,
    fixed_mask: Image | None,
    moving_mask: Image | None,
    max_iter: int,
    level: int,
    seed: int,
    callback: Callback | None,
) -> None:
    t0 = time.perf_counter()
    record.size = fixed.grid.size
    optimizer = build_optimizer(stage.optimizer, transform.parameters())
    pointwise = all(term.measure in POINTWISE_MEASURES for term in stage.objective)
    data = LinearLevel(fixed, moving, fixed_mask, moving_mask, stage.interpolation,
                       stage.max_voxels if pointwise else None, seed + level)
    record.voxels = data.voxels
    params = [p for p in transform.parameters() if p.requires_grad]
    cache: dict[str, Any] = {"evaluations": 0}

    def evaluate() -> tuple[torch.Tensor, dict[str, float]]:
        matrix = transform.matrix()
        fixed_t, warped, mask = data.warp(matrix)
        if not bool((mask > 0).any()):
            # a line search probing far away: a high, flat loss sends it back
            return matrix.sum() * 0 + OUT_OF_VIEW_LOSS, {}
        loss, parts = objective(fixed_t, warped, mask, fixed.grid.spacing)
        if not torch.isfinite(loss):
            raise RegistrationError(f"non-finite loss ({float(loss)}) at stage {record.stage}, level {level}")
        return loss, parts

    def closure() -> torch.Tensor:
        """Loss times ``cache['scale']`` (see below) with its gradient; raw loss in the cache."""
        # LBFGS re-evaluates the point its line search ended on: answer that from the cache.
        key = torch.cat([p.detach().reshape(-1) for p in params])
        if "key" in cache and torch.equal(cache["key"], key):
            for p, g in zip(params, cache["grads"]):
                p.grad = g.clone()
            return cache["loss"]
        optimizer.zero_grad()
        loss, parts = evaluate()
        scaled = loss * cache.setdefault("scale", 1.0)
        scaled.backward()
        cache["evaluations"] += 1
        cache.update(key=key, loss=scaled.detach(), raw=float(loss.detach()), parts=parts,
                     grads=[p.grad.detach().clone() for p in params])
        return scaled

    # Scale the objective so that its largest initial gradient component is 1 per mm (parameters
    # are in physical-shift units): the first LBFGS step then moves at most ~1 mm, SGD learning
    # rates read as mm, and float32 losses stay well resolved. The optimum is unchanged.
    closure()
    gmax = max(float(g.abs().max()) for g in cache["grads"]) if params else 0.0
    if gmax > 0 and math.isfinite(gmax):
        cache["scale"] = 1.0 / gmax
        cache.pop("key")

    best, stale = math.inf, 0
    best_params = [p.detach().clone() for p in params]
    record.stop_reason = "max_iterations"
    for it in range(max_iter):
        # torch optimisers return the closure's value at the parameters the step started from
        loss = float(optimizer.step(closure).detach()) / cache["scale"]
        record.losses.append(loss)
        record.iterations = it + 1
        if callback is not None:
            callback({"event": "iteration", "stage": record.stage, "level": level, "factor": record.factor,
                      "iteration": it, "loss": loss, "terms": cache.get("parts", {})})
        if loss < best:
            best_params = [p.detach().clone() for p in params]
        if not math.isfinite(best) or loss < best - stage.stopping.rel_tol * abs(best):
            best, stale = loss, 0
        else:
            stale += 1
            if stale >= stage.stopping.patience:
                record.stop_reason = "converged"
                break
    final = float(closure().detach()) / cache["scale"]  # loss at the final parameters (cached when just evaluated)
    if final > best:  # a last step that made things worse (a failed line search): keep the best iterate
        with torch.no_grad():
            for p, value in zip(params, best_params):
                p.copy_(value)
        final = float(closure().detach()) / cache["scale"]
    if final >= OUT_OF_VIEW_LOSS:
        raise RegistrationError(
            f"stage {record.stage} level {level}: the transform moved the moving image out of the fixed field of view"
        )
    record.losses.append(final)
    record.seconds = time.perf_counter() - t0
    record.evaluations = cache["evaluations"]
    log.debug("stage %d level %d (x%g): %d iterations, loss %.6g, %s", record.stage, level, record.factor,
              record.iterations, record.losses[-1] if record.losses else math.nan, record.stop_reason)
    if callback is not None:
        callback({"event": "level", **asdict(record)})
