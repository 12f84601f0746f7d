"""Typed params models of registered components, read from their signatures.

Every registry (measures, regularisers, transforms) holds classes whose keyword parameters are
the params a config may give them. :func:`signature_model` turns a signature into a pydantic model
(annotations and defaults; unknown keys rejected), so validation, error messages and listings read
the component itself: adding a parameter to a class is the only edit.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

__all__ = ["signature_model", "check_params"]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def signature_model(factory: Callable[..., Any], name: str, skip: Iterable[str] = ()) -> type[BaseModel]:
    """A model of ``factory``'s keyword parameters (``self``/``cls``, ``*args``, ``**kwargs`` and
    ``skip`` left out); annotations that do not resolve are ``Any``."""
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # an annotation that names something the module does not import
        hints = {}
    fields: dict[str, Any] = {}
    for pname, p in inspect.signature(factory).parameters.items():
        if pname in ("self", "cls", *skip) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        fields[pname] = (hints.get(pname, Any), ... if p.default is p.empty else p.default)
    return create_model(f"{name}Params", __base__=_Params, **fields)


def check_params(model: type[BaseModel], params: dict[str, Any], what: str) -> None:
    """Validate ``params`` against ``model``; ValueError naming ``what`` and the accepted params."""
    try:
        model.model_validate(params)
    except ValidationError as exc:
        accepted = ", ".join(model.model_fields) or "none"
        raise ValueError(f"bad params for {what} (accepted: {accepted}): {exc}") from None
