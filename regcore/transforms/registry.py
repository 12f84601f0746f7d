"""The one registry of transforms: name -> class, with each entry's capability (``is_linear``) and
its typed params model (the signature of its ``from_config``).

A new transform is one module (a :class:`~regcore.transforms.base.Transform` subclass with a
``kind`` and, if its stage params differ from its constructor's, a ``from_config``) plus one line
here. Config validation (:mod:`regcore.config`), error messages, ``regcore methods`` and
registration read this registry; no list of names exists elsewhere.
"""

from __future__ import annotations

import inspect
import typing
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from ..errors import InputError
from ..grid import Grid
from .base import Transform
from .bspline import BSplineTransform
from .deformable import DeformableTransform, DenseDisplacement
from .linear import LINEAR_TRANSFORMS
from .svf import StationaryVelocityField
from .syn import SymmetricDiffeomorphism
from .wendland import WendlandTransform

__all__ = ["TRANSFORMS", "DEFORMABLE_TRANSFORMS", "transform_class", "deformable_transform_class",
           "params_model", "check_params", "build_transform"]

#: every transform by name, linear first
TRANSFORMS: dict[str, type[Transform]] = {
    **LINEAR_TRANSFORMS,
    "dense": DenseDisplacement,
    "ffd": BSplineTransform,
    "wendland": WendlandTransform,
    "svf": StationaryVelocityField,
    "syn": SymmetricDiffeomorphism,
}

#: the deformable entries (capability ``is_linear`` False)
DEFORMABLE_TRANSFORMS: dict[str, type[DeformableTransform]] = {
    name: cls for name, cls in TRANSFORMS.items() if not cls.is_linear  # type: ignore[misc]
}


def transform_class(name: str) -> type[Transform]:
    """The transform registered under ``name``; :class:`InputError` lists the names otherwise."""
    if name not in TRANSFORMS:
        raise InputError(f"unknown transform {name!r}; choose one of {sorted(TRANSFORMS)}")
    return TRANSFORMS[name]


def deformable_transform_class(name: str) -> type[DeformableTransform]:
    """The deformable transform registered under ``name``."""
    if name not in DEFORMABLE_TRANSFORMS:
        raise InputError(f"unknown deformable transform {name!r}; choose one of {sorted(DEFORMABLE_TRANSFORMS)}")
    return DEFORMABLE_TRANSFORMS[name]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


@lru_cache(maxsize=None)
def params_model(name: str) -> type[BaseModel]:
    """The typed model of a transform's stage params: the keyword parameters of its
    ``from_config`` after ``grid`` (of its constructor when ``from_config`` is the base's), with
    their annotations and defaults (unknown keys rejected)."""
    cls = transform_class(name)
    factory = cls.__init__ if cls.from_config.__func__ is Transform.from_config.__func__ else cls.from_config
    signature = inspect.signature(factory)
    hints = typing.get_type_hints(factory)
    fields: dict[str, Any] = {}
    for pname, p in signature.parameters.items():
        if pname in ("self", "cls", "grid", "dtype") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        fields[pname] = (hints.get(pname, Any), ... if p.default is p.empty else p.default)
    return create_model(f"{cls.__name__}Params", __base__=_Params, **fields)


def check_params(name: str, params: dict[str, Any]) -> None:
    """Validate a stage's ``transform_params`` for ``name``; ValueError naming the accepted ones."""
    model = params_model(name)
    try:
        model.model_validate(params)
    except ValidationError as exc:
        accepted = ", ".join(model.model_fields) or "none"
        raise ValueError(f"bad transform_params for {name!r} (accepted: {accepted}): {exc}") from None


def build_transform(name: str, grid: Grid, params: dict[str, Any] | None = None) -> Transform:
    """The transform ``name`` for a registration on the fixed ``grid`` with a stage's params."""
    params = dict(params or {})
    try:
        check_params(name, params)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    return transform_class(name).from_config(grid, **params)
