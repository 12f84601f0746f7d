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

PRESETS: dict[str, dict] = {
    "translation": {"name": "translation", "stages": [dict(_LINEAR_STAGE, transform="translation")]},
    "rigid": {"name": "rigid", "stages": [dict(_LINEAR_STAGE, transform="rigid")]},
    "similarity": {"name": "similarity", "stages": [dict(_LINEAR_STAGE, transform="similarity")]},
    "affine": {
        "name": "affine",
        "stages": [
            dict(_LINEAR_STAGE, transform="rigid", pyramid={"factors": [4, 2], "iterations": [40, 20]}),
            dict(_LINEAR_STAGE, transform="affine", init="previous"),
        ],
    },
}


def available_methods() -> list[str]:
    return sorted(PRESETS)


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
        if method not in PRESETS:
            raise InputError(f"unknown method {method!r}; available: {', '.join(available_methods())}")
        base = copy.deepcopy(PRESETS[method])
    source = "config"
    if overrides is not None:
        if isinstance(overrides, (str, Path)):
            source = str(overrides)
            overrides = load_yaml(overrides)
        base = deep_merge(base, overrides)
    return validate_config(base, source)
