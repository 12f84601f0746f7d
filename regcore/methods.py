"""Named method presets, as plain config dicts, and how to build a validated config from them.

Presets are starting points: ``method_config("affine", {"stages": [{"objective": [...]}]})``
deep-merges the overrides (see :func:`regcore.config.deep_merge`) and validates the result.
"""

from __future__ import annotations

import copy
from pathlib import Path

from .config import MethodConfig, deep_merge, load_yaml, validate_config
from .errors import InputError

__all__ = ["PRESETS", "method_config", "available_methods"]

_LINEAR_STAGE = {
    "init": "moments",
    "objective": [{"measure": "ncc", "weight": 1.0}],
    "optimizer": {"name": "lbfgs", "lr": 1.0, "params": {"max_iter": 1, "line_search_fn": "strong_wolfe"}},
    "pyramid": {"factors": [4, 2, 1], "iterations": [100, 60, 30]},
    "stopping": {"rel_tol": 1e-6, "patience": 5},
    "normalize": "percentile",
    "max_voxels": 200_000,
}

_AFFINE_LEVELS = {
    "objective": [{"measure": "lcc", "params": {"radius": 2}}],
    "optimizer": {"name": "rsgd", "lr": 1.0},
    "stopping": {"rel_tol": 1e-6, "patience": 10},
}

PRESETS: dict[str, dict] = {
    "translation": {"name": "translation", "stages": [dict(_LINEAR_STAGE, transform="translation")]},
    "rigid": {"name": "rigid", "stages": [dict(_LINEAR_STAGE, transform="rigid")]},
    "similarity": {"name": "similarity", "stages": [dict(_LINEAR_STAGE, transform="similarity")]},
    # rigid then affine on local squared correlation (robust to bias fields and contrast changes
    # between scanners, as greedy's WNCC affine), regular-step gradient descent (one evaluation
    # per iteration instead of a line search's half dozen), levels at 8 and 4 mm whatever the
    # voxel size: the deformable presets that follow refine below that; moments initialisation
    # absorbs offsets of centimetres between native-space scans
    "affine": {
        "name": "affine",
        "stages": [
            dict(_LINEAR_STAGE, transform="rigid", **_AFFINE_LEVELS, pyramid={"spacing_mm": [8, 4], "iterations": [40, 20]}),
            dict(_LINEAR_STAGE, transform="affine", init="previous", **_AFFINE_LEVELS,
                 pyramid={"spacing_mm": [8, 4], "iterations": [60, 30]}),
        ],
    },
}


_DEFORMABLE_STAGE = {
    "init": "previous",
    "objective": [{"measure": "lncc", "params": {"window": 7}}],
    # plain gradient descent on the objective scaled to a unit initial gradient: the largest
    # update is ~lr mm; Adam's per-voxel normalisation would amplify noise in flat regions
    "optimizer": {"name": "sgd", "lr": 1.0, "params": {"momentum": 0.9}},
    # levels in mm, not relative factors: a control grid or velocity grid of a few mm must never be
    # fitted on a level coarser than itself (a 3 mm image at factor 4 is a 12 mm level, which
    # leaves nodes between samples to the regulariser and aliases the coarse solution)
    "pyramid": {"spacing_mm": [4, 2], "iterations": [100, 60]},
    "stopping": {"rel_tol": 1e-5, "patience": 15},
    "normalize": "percentile",
}

# ffd and svf are tuned for 3D brain MRI at 1 mm (levels at 4 and 2 mm; no full-resolution level,
# which would cost ~8x a 2 mm iteration: 60 s on 2 CPU cores; images coarser than 2 mm run at
# their own resolution) and work unchanged on lung CT and 2D:
# LNCC over 5 voxels (10 mm at the 2 mm level: local enough for small structures, wide enough
# for real MR noise), many cheap coarse iterations and few fine ones.
_BRAIN_TUNED = {
    "objective": [{"measure": "lncc", "params": {"window": 5}}],
    "pyramid": {"spacing_mm": [4, 2], "iterations": [100, 40]},
}

PRESETS.update(
    {
        # cubic B-spline FFD, control points every 6 mm, bending energy (evaluated at half the
        # control spacing, see BSplineTransform.regularization_grid)
        "ffd": {"name": "ffd", "stages": [dict(_DEFORMABLE_STAGE, transform="ffd", **_BRAIN_TUNED,
                                               transform_params={"control_spacing_mm": 6.0},
                                               regularizers=[{"name": "bending", "weight": 10.0}])]},
        # stationary velocity field on a 4 mm grid (whatever the image resolution), exponentiated
        # by scaling and squaring; updates smoothed (fluid-like) plus a little diffusion of the
        # velocity on its own grid (more diffusion, or a finer grid, lowered brain Dice)
        "svf": {"name": "svf", "stages": [dict(_DEFORMABLE_STAGE, transform="svf", **_BRAIN_TUNED,
                                               transform_params={"control_spacing_mm": 4.0},
                                               regularizers=[{"name": "diffusion", "weight": 0.5}],
                                               smoothing={"update_sigma_mm": 2.0})]},
        # diffeomorphic demons: SSD, velocity updates smoothed (fluid) and the field smoothed
        # (diffusion) after every step, as AirLab's demons regulariser; velocity on a grid at half
        # the image resolution, levels at 4 and 2 mm (3 mm known field: error 1.66 -> 0.35 mm)
        "demons": {"name": "demons", "stages": [dict(_DEFORMABLE_STAGE, transform="svf",
                                                     objective=[{"measure": "mse"}],
                                                     transform_params={"control_factor": 2.0},
                                                     smoothing={"update_sigma_mm": 1.0, "field_sigma_mm": 1.0})]},
    }
)


# symmetric diffeomorphic normalisation (ANTs SyN's scheme, greedy-style updates; regcore.greedy):
# local squared correlation over 5^3 voxels with analytic gradients (flat windows, b c <= 1e-6,
# ignored), levels at 8, 4, 2 and 1 mm (an image coarser than a level runs it at its own
# resolution: a 2 mm brain gets 8/4/2 mm with 26 iterations at 2 mm), steps of at most 0.75 voxel
# per half, updates smoothed by 1.25 voxel and the half fields by 0.5 voxel of each level, as ANTs
# and greedy scale them (voxels, not mm). Tuned on real T1 brains (brain-t1, 2 mm) and, for the
# 1 mm level, on the same brains resampled to 1 mm (brain-t1-1mm: +0.016 Dice on 10 of 10 pairs
# against mm floors of 2.5 / 1.0 mm, which kept the 1 mm level as smooth in mm as the 2 mm one)
# and the 1 mm label maps (+0.016); Colin27 -> MNI152, whose AAL map was propagated by an MI
# registration, prefers the floors (-0.013): benchmarks/configs/syn-1mm-floors.yaml restores them.
# The 1 mm level costs about 10 s of a 1 mm pair on 2 CPU cores (benchmarks/README.md).
_SYN_STAGE = {
    "transform": "syn",
    "init": "previous",
    "objective": [{"measure": "lcc", "params": {"radius": 2, "exact": False, "eps": 1e-6}}],
    "optimizer": {"name": "greedy", "lr": 0.75},
    "pyramid": {"spacing_mm": [8, 4, 2, 1], "iterations": [100, 60, 20, 6]},
    "smoothing": {"update_sigma_vox": 1.25, "field_sigma_vox": 0.5},
    "stopping": {"rel_tol": 1e-5, "patience": 20},
    "normalize": "percentile",
}
PRESETS["syn"] = {"name": "syn", "stages": [_SYN_STAGE]}


def available_methods() -> list[str]:
    """Preset names; any ``linear+deformable`` chain of them (``affine+svf``) is valid too."""
    return sorted(PRESETS)


def _preset(name: str) -> dict:
    """A preset by name; ``a+b`` chains the stages of ``a`` and ``b``."""
    parts = name.split("+")
    for part in parts:
        if part not in PRESETS:
            raise InputError(f"unknown method {name!r}; available: {', '.join(available_methods())} and chains such as affine+svf")
    stages = [stage for part in parts for stage in copy.deepcopy(PRESETS[part]["stages"])]
    return {"name": name, "stages": stages}


def method_config(method: str | dict | MethodConfig, overrides: dict | str | Path | None = None) -> MethodConfig:
    """A validated :class:`MethodConfig` from a preset name (or a full dict) plus overrides.

    Args:
        method: preset name (see :data:`PRESETS`), a full config dict, or a config.
        overrides: a dict or a YAML file path, deep-merged over the preset. A YAML file that holds
            ``stages`` *and* ``name`` replaces nothing: it is merged like any other override.
    """
    if isinstance(method, MethodConfig):
        base = method.model_dump(mode="json")
    elif isinstance(method, dict):
        base = copy.deepcopy(method)
    else:
        base = _preset(method)
    source = "config"
    if overrides is not None:
        if isinstance(overrides, (str, Path)):
            source = str(overrides)
            overrides = load_yaml(overrides)
        base = deep_merge(base, overrides)
    return validate_config(base, source)
