"""The one registry of transforms: name -> class, with each entry's capability (``is_linear``) and
its typed params model (the signature of its ``from_config``).

A new transform is one module (a :class:`~regcore.transforms.base.Transform` subclass with a
``kind`` and, if its stage params differ from its constructor's, a ``from_config``) plus one line
here. Config validation (:mod:`regcore.config`), error messages, ``regcore methods`` and
registration read this registry; no list of names exists elsewhere.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import BaseModel

from ..errors import InputError
from ..grid import Grid
from ..params import check_params as check_against
from ..params import signature_model
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


@lru_cache(maxsize=None)
def params_model(name: str) -> type[BaseModel]:
    """The typed model of a transform's stage params: the keyword parameters of its
    ``from_config`` after ``grid`` (of its constructor when ``from_config`` is the base's), with
    their annotations and defaults (unknown keys rejected)."""
    cls = transform_class(name)
    factory = cls.__init__ if cls.from_config.__func__ is Transform.from_config.__func__ else cls.from_config
    return signature_model(factory, cls.__name__, skip=("grid", "dtype"))


def check_params(name: str, params: dict[str, Any]) -> None:
    """Validate a stage's ``transform_params`` for ``name``; ValueError naming the accepted ones."""
    check_against(params_model(name), params, f"transform {name!r} (transform_params)")


def build_transform(name: str, grid: Grid, params: dict[str, Any] | None = None) -> Transform:
    """The transform ``name`` for a registration on the fixed ``grid`` with a stage's params."""
    params = dict(params or {})
    try:
        check_params(name, params)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    return transform_class(name).from_config(grid, **params)
