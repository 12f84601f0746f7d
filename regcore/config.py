"""Validated method configurations (pydantic) and their canonical hash.

A method is a list of stages; each stage fits one transform with one objective over a pyramid.
Configs come from plain dicts or YAML; unknown keys are errors, so a typo never passes silently.
The canonical hash (sha256 of the sorted, compact JSON of the validated config) names results.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from .errors import InputError
from .losses.modules import LOSSES
from .optimizers import OPTIMIZERS as OPTIMIZER_CLASSES
from .regularizers.modules import REGULARIZERS as REGULARIZER_CLASSES
from .params import check_params as check_against
from .params import signature_model
from .transforms.init import INITIALIZERS
from .transforms.registry import TRANSFORMS, check_params

__all__ = [
    "TermConfig",
    "OptimizerConfig",
    "PyramidConfig",
    "StoppingConfig",
    "StageConfig",
    "MethodConfig",
    "config_hash",
    "deep_merge",
    "load_yaml",
    "validate_config",
    "canonical_config",
    "legacy_config_hash",
]

#: names from the registries (one source of truth: a new measure is one class + one registration)
MEASURES = tuple(LOSSES)
TRANSFORM_NAMES = tuple(TRANSFORMS)
#: initialisers of a stage: the registry's, or "previous" (start from the stage before)
INIT_NAMES = tuple(INITIALIZERS) + ("previous",)
REGULARIZERS = tuple(REGULARIZER_CLASSES)
#: Keys that give one setting in different ways: an override naming one drops the others.
ALTERNATIVE_KEYS = (("factors", "spacing_mm"),)
#: torch optimisers; ``rsgd``: regular-step gradient descent (:mod:`regcore.step_descent`, ITK's);
#: ``greedy``: the normalised compositive steps of the ``syn`` transform (:mod:`regcore.greedy`),
#: ``lr`` being the largest step in voxels.
OPTIMIZERS = tuple(OPTIMIZER_CLASSES) + ("greedy",)


@functools.lru_cache(maxsize=None)
def component_params_model(kind: str, name: str) -> type[BaseModel]:
    """The typed params model of a registered measure, regulariser or optimiser (its constructor's
    signature; an optimiser's ``params`` and ``lr`` are not params of the config's ``params``)."""
    cls = {"measure": LOSSES, "regularizer": REGULARIZER_CLASSES, "optimizer": OPTIMIZER_CLASSES}[kind][name]
    return signature_model(cls.__init__, cls.__name__, skip=("params", "lr"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TermConfig(_Strict):
    """One weighted similarity term: ``weight * loss(measure, **params)``."""

    measure: Literal[MEASURES]  # type: ignore[valid-type]
    weight: float = Field(1.0, gt=0)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _typed_params(self) -> "TermConfig":
        check_against(component_params_model("measure", self.measure), self.params, f"measure {self.measure!r}")
        return self


class RegularizerConfig(_Strict):
    """One weighted regulariser of a deformable stage: ``weight * regulariser(field, **params)``."""

    name: Literal[REGULARIZERS]  # type: ignore[valid-type]
    weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _typed_params(self) -> "RegularizerConfig":
        check_against(component_params_model("regularizer", self.name), self.params, f"regularizer {self.name!r}")
        return self


class SmoothingConfig(_Strict):
    """Demons-style Gaussian smoothing of each update (the gradient, fluid-like) and of the field
    after each step (diffusion-like), as AirLab's demons regulariser.

    ``*_mm``: standard deviations in mm (``dense``/``svf`` stages). ``*_vox``: in voxels of the
    pyramid level (the ``syn`` transform's greedy optimiser, as ANTs and greedy give them): the
    same relative smoothing at every level and resolution. A ``syn`` stage given both takes the
    larger per axis, ``max(*_vox, *_mm / level spacing)`` voxels: relative on coarse levels, never
    finer than ``*_mm`` on fine ones (a 1 mm level smoothed as physically as the 2 mm level
    before it, so the finest level refines boundaries without fitting noise).
    """

    update_sigma_mm: float = Field(0.0, ge=0)
    field_sigma_mm: float = Field(0.0, ge=0)
    update_sigma_vox: float = Field(0.0, ge=0)
    field_sigma_vox: float = Field(0.0, ge=0)

    @model_serializer(mode="wrap")
    def _drop_unused_voxel_sigmas(self, handler: Any) -> dict:
        # the voxel sigmas are left out while zero, so configs written before they existed keep
        # their canonical hash
        data = handler(self)
        for key in ("update_sigma_vox", "field_sigma_vox"):
            if not data.get(key):
                data.pop(key, None)
        return data


class OptimizerConfig(_Strict):
    """A ``torch.optim`` optimiser by name; ``params`` go to its constructor."""

    name: Literal[OPTIMIZERS] = "lbfgs"  # type: ignore[valid-type]
    lr: float = Field(1.0, gt=0)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _lbfgs_defaults(self) -> "OptimizerConfig":
        # regcore's loop takes one LBFGS iteration per step; without a line search LBFGS is unsafe
        if self.name == "lbfgs":
            self.params = {"max_iter": 1, "line_search_fn": "strong_wolfe", **self.params}
        if self.name in OPTIMIZER_CLASSES:  # "greedy" (the syn transform's steps) takes only lr
            check_against(component_params_model("optimizer", self.name), self.params, f"optimizer {self.name!r}")
        elif self.params:
            raise ValueError(f"optimizer {self.name!r} takes no params (its step is lr), got {sorted(self.params)}")
        return self


class PyramidConfig(_Strict):
    """The levels of one stage (coarse first) and the maximum iterations at each level.

    Levels are given one of two ways (not both):

    - ``factors``: downsampling factors relative to the fixed image (``[4, 2, 1]``: a quarter,
      half and full resolution, whatever the voxel size). The default, ``[4, 2, 1]``.
    - ``spacing_mm``: target voxel sizes in mm (``[4, 2]``: levels at 4 mm and 2 mm). Each
      image's factor is ``spacing_mm / its finest-axis spacing``, never below 1: the same
      setting gives 4 and 2 mm levels on a 1 mm or a 2 mm brain, and the image's own resolution
      where it is coarser than a level (a 3 mm image: 4 and 3 mm). Anisotropic images are
      downsampled by one factor on all axes, set by their finest axis (a 1.4 x 1.4 x 2.5 mm CT:
      about 4 x 4 x 7.3 mm at the 4 mm level). Consecutive levels that come out equal (a 4 mm
      image with ``[4, 2]``) run as one level with their iterations added up.

    A config override that names either key replaces the other (see :func:`deep_merge`).
    """

    factors: list[float] | None = None
    spacing_mm: list[float] | None = None
    iterations: list[int] = Field(default_factory=lambda: [50, 30, 20])
    min_size: int = Field(8, ge=2)

    @model_validator(mode="before")
    @classmethod
    def _broadcast_iterations(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("iterations"), int):
            data = dict(data)
            n = len(data.get("factors") or data.get("spacing_mm") or [4.0, 2.0, 1.0])
            data["iterations"] = [data["iterations"]] * n
        return data

    @model_validator(mode="after")
    def _check(self) -> "PyramidConfig":
        if self.factors is not None and self.spacing_mm is not None:
            raise ValueError("give the pyramid levels as factors or as spacing_mm, not both")
        if self.factors is None and self.spacing_mm is None:
            self.factors = [4.0, 2.0, 1.0]
        levels, what = (self.factors, "factors") if self.factors is not None else (self.spacing_mm, "spacing_mm")
        if not levels:
            raise ValueError("pyramid needs at least one level")
        if len(self.iterations) != len(levels):
            raise ValueError(f"pyramid has {len(levels)} {what} but {len(self.iterations)} iteration counts")
        if self.factors is not None and any(f < 1 for f in self.factors):
            raise ValueError("pyramid factors must be >= 1")
        if self.spacing_mm is not None and any(not s > 0 for s in self.spacing_mm):
            raise ValueError("pyramid spacing_mm must be > 0")
        if any(i < 0 for i in self.iterations):
            raise ValueError("iteration counts must be >= 0")
        return self

    @property
    def n_levels(self) -> int:
        """Number of levels as configured (before equal levels are merged)."""
        return len(self.iterations)

    def level_factors(
        self, spacing: Sequence[float], moving_spacing: Sequence[float] | None = None
    ) -> list[tuple[float, float, int]]:
        """``[(fixed factor, moving factor, max_iterations)]`` per level, for images of voxel size
        ``spacing`` (fixed) and ``moving_spacing`` (mm; default: the fixed one).

        With ``factors`` both images use the configured factor (relative levels). With
        ``spacing_mm`` each image's factor is ``max(1, spacing_mm / its finest spacing)``, rounded
        to 6 decimals (so that float noise in a header neither misses a precomputed level nor
        splits a level); consecutive levels whose factors are both equal merge into one whose
        iteration count is their sum.
        """
        if self.factors is not None:
            return [(float(f), float(f), int(i)) for f, i in zip(self.factors, self.iterations)]

        def factor(target: float, voxel: Sequence[float]) -> float:
            return round(max(1.0, float(target) / min(float(v) for v in voxel)), 6)

        moving_spacing = spacing if moving_spacing is None else moving_spacing
        out: list[tuple[float, float, int]] = []
        for target, iters in zip(self.spacing_mm, self.iterations):
            level = (factor(target, spacing), factor(target, moving_spacing))
            if out and out[-1][:2] == level:
                out[-1] = (*level, out[-1][2] + int(iters))
            else:
                out.append((*level, int(iters)))
        return out

    @model_serializer(mode="wrap")
    def _drop_unused_spelling(self, handler: Any) -> dict:
        # the spelling not in use is left out, so configs written before spacing_mm existed (and
        # every config with factors) keep their canonical hash
        data = handler(self)
        for key in ("factors", "spacing_mm"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class StoppingConfig(_Strict):
    """Stop a level when the loss has not improved by ``rel_tol * |best|`` for ``patience`` iterations."""

    rel_tol: float = Field(1e-6, ge=0)
    patience: int = Field(10, ge=1)


class StageConfig(_Strict):
    """One transform fitted over one pyramid.

    Linear stages (``translation`` ... ``affine``) fit a linear map; deformable stages (``dense``,
    ``ffd``, ``wendland``, ``svf``) fit a displacement in the fixed space that is followed by the
    linear map of the stages before (``init`` of a first, deformable stage may centre the images
    with a translation). ``transform_params`` go to the transform's constructor (e.g.
    ``control_spacing_mm`` for ``ffd``); ``regularizers`` and ``smoothing`` apply to deformable
    stages only.
    """

    transform: Literal[TRANSFORM_NAMES]  # type: ignore[valid-type]
    init: Literal[INIT_NAMES] = "geometry"  # type: ignore[valid-type]
    transform_params: dict[str, Any] = Field(default_factory=dict)
    regularizers: list[RegularizerConfig] = Field(default_factory=list)
    smoothing: SmoothingConfig | None = None
    objective: list[TermConfig] = Field(default_factory=lambda: [TermConfig(measure="ncc")])
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    pyramid: PyramidConfig = Field(default_factory=PyramidConfig)
    stopping: StoppingConfig = Field(default_factory=StoppingConfig)
    normalize: Literal["none", "minmax", "percentile"] = "percentile"
    interpolation: Literal["linear", "nearest"] = "linear"
    #: Pointwise measures (mse, ncc, mi, nmi) use at most this many fixed voxels per level (a
    #: seeded stratified subset); None uses all. Neighbourhood measures always use all voxels.
    max_voxels: int | None = Field(None, ge=1000)

    @field_validator("objective")
    @classmethod
    def _non_empty(cls, v: list[TermConfig]) -> list[TermConfig]:
        if not v:
            raise ValueError("objective needs at least one term")
        return v

    @property
    def deformable(self) -> bool:
        return not TRANSFORMS[self.transform].is_linear

    @model_validator(mode="after")
    def _deformable_only(self) -> "StageConfig":
        check_params(self.transform, self.transform_params)  # the registry's typed params model
        if not self.deformable and (self.regularizers or self.smoothing is not None):
            raise ValueError(f"regularizers and smoothing apply to deformable stages, not to {self.transform!r}")
        greedy = self.optimizer.name == "greedy"
        if (self.transform == "syn") != greedy:
            raise ValueError("the 'syn' transform is fitted by the 'greedy' optimizer, and 'greedy' fits only 'syn' "
                             f"(got transform {self.transform!r} with optimizer {self.optimizer.name!r})")
        if greedy and self.regularizers:
            raise ValueError("a 'syn' stage is regularised by its smoothing (update_sigma_vox, field_sigma_vox), "
                             "not by regularizers")
        return self


class MethodConfig(_Strict):
    """A named registration method: stages run in order, each starting from the previous one."""

    name: str
    stages: list[StageConfig]
    seed: int = 0

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[StageConfig]) -> list[StageConfig]:
        if not v:
            raise ValueError("a method needs at least one stage")
        deformable = [i for i, stage in enumerate(v) if stage.deformable]
        if len(deformable) > 1 or (deformable and deformable[0] != len(v) - 1):
            raise ValueError("a method has at most one deformable stage, and it comes last")
        return v


def validate_config(data: dict | MethodConfig, source: str = "config") -> MethodConfig:
    """Validate a plain dict into a :class:`MethodConfig`; errors become :class:`InputError`."""
    if isinstance(data, MethodConfig):
        return data
    try:
        return MethodConfig.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"{source}: invalid method configuration:\n{exc}") from exc


def _defaults(component: Any) -> dict[str, Any]:
    """The keyword defaults of a component's constructor (or function)."""
    out: dict[str, Any] = {}
    for name, p in inspect.signature(component).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        out[name] = p.default
    return out


def canonical_config(config: MethodConfig) -> dict:
    """The config as hashed: its JSON dump with every measure's and regulariser's params completed
    by the defaults of its registered class, so that ``lncc {}`` and ``lncc {window: <default>}``
    are one config. (Optimiser params are hashed as given: a torch release that adds an option
    must not change the hash of every stored result.)"""
    data = config.model_dump(mode="json")
    for stage in data["stages"]:
        for term in stage.get("objective") or []:
            term["params"] = {**_defaults(LOSSES[term["measure"]]), **term["params"]}
        for reg in stage.get("regularizers") or []:
            reg["params"] = {**_defaults(REGULARIZER_CLASSES[reg["name"]]), **reg["params"]}
    return json.loads(json.dumps(data, default=str))


def config_hash(config: MethodConfig) -> str:
    """Canonical hash (16 hex digits) of a validated config, over :func:`canonical_config`: equal
    configs (params given or left to their defaults), equal hashes."""
    text = json.dumps(canonical_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def legacy_config_hash(config: MethodConfig) -> str:
    """The hash stores written before :func:`canonical_config` hold (params as given): a pair
    complete under it counts as complete with the same config (upgrading reruns nothing)."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def deep_merge(base: dict, override: dict) -> dict:
    """Recursive merge: dicts merge by key; ``stages`` lists merge element-wise; other values replace.

    A mapping whose ``name`` differs from the base's (say an optimiser ``adam`` over ``lbfgs``)
    replaces it whole, so options of the old choice never leak into the new one. Likewise keys
    that are alternative spellings of one setting (:data:`ALTERNATIVE_KEYS`: a pyramid's
    ``factors`` and ``spacing_mm``): an override naming one drops the other from the base.
    """
    out = copy.deepcopy(base)
    for group in ALTERNATIVE_KEYS:
        named = [key for key in group if key in override]
        if named:
            for key in group:
                if key not in named:
                    out.pop(key, None)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value.get("name", out[key].get("name")) == out[key].get("name"):
            out[key] = deep_merge(out[key], value)
        elif key == "stages" and isinstance(value, list) and isinstance(out.get(key), list):
            merged = list(out[key])
            for i, stage in enumerate(value):
                if i < len(merged) and isinstance(stage, dict) and isinstance(merged[i], dict):
                    merged[i] = deep_merge(merged[i], stage)
                elif i < len(merged):
                    merged[i] = stage
                else:
                    merged.append(stage)
            out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with clear errors for a missing, unreadable or non-mapping file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config {str(p)!r}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"config {str(p)!r}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config {str(p)!r}: must hold a mapping at the top level, got {type(data).__name__}")
    return data
