"""Similarity losses as :class:`torch.nn.Module` wrappers of :mod:`regcore.losses.functional`.

Every module returns a 0-dim tensor to *minimise*. The constructor stores the keyword arguments
of the underlying functional; ``forward(fixed, moving, mask=None, **overrides)`` calls it with the
stored arguments updated by ``overrides`` (e.g. a per-pyramid-level ``spacing`` for
:class:`NGFLoss`). Image shapes and conventions are those of :mod:`regcore.losses.functional`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from regcore.errors import InputError
import regcore.losses.functional as L
from regcore.losses.local_cc import local_cc

__all__ = [
    "SimilarityLoss",
    "MSELoss",
    "NCCLoss",
    "LNCCLoss",
    "LocalCCLoss",
    "SSIMLoss",
    "MILoss",
    "NMILoss",
    "NGFLoss",
    "LOSSES",
    "build_loss",
]


class SimilarityLoss(nn.Module):
    """Base class: stores functional keyword arguments and maps the measure to a loss.

    Subclasses set ``measure`` (the functional) and implement :meth:`to_loss`.

    ``overlap_only``: the measure is averaged over the fixed points that map inside the moving
    image (the registration masks the others out). A measure for which points outside contribute
    a constant (``lcc``: a window of border-replicated values is flat and scores 0) sets it False
    and is averaged over the whole fixed domain: then the overlap's changes do not move the value
    in ways its gradient cannot see.
    """

    #: capability: the measure is a mean over voxels (a random subset of voxels estimates it);
    #: local measures (windows, gradients) need the whole grid
    pointwise: bool = False

    measure: Callable[..., Tensor]
    overlap_only: bool = True
    #: capability: the functional takes ``per_sample=True`` and returns one value per batch element
    #: (else :meth:`per_sample` evaluates the elements one by one)
    batched_values: bool = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs: dict[str, Any] = dict(kwargs)

    def to_loss(self, value: Tensor) -> Tensor:
        """Map the similarity value to a quantity to minimise."""
        raise NotImplementedError

    def forward(
        self, fixed: Tensor, moving: Tensor, mask: Optional[Tensor] = None, **overrides: Any
    ) -> Tensor:
        """Loss of ``moving`` (warped onto the fixed grid) w.r.t. ``fixed``.

        Args:
            fixed, moving: ``(N, C, *spatial)``.
            mask: Optional weights broadcastable to ``(N, 1, *spatial)``.
            **overrides: Functional keyword arguments replacing the stored ones for this call.

        Returns:
            0-dim tensor to minimise.
        """
        kwargs = {**self.kwargs, **overrides}
        return self.to_loss(type(self).measure(fixed, moving, mask=mask, **kwargs))

    def per_sample(self, fixed: Tensor, moving: Tensor, mask: Optional[Tensor] = None, **overrides: Any) -> Tensor:
        """The loss of each batch element on its own, ``(N,)``: the losses of a batch of
        independent pairs (the gradient of their sum gives each pair its own gradient)."""
        if type(self).batched_values:
            kwargs = {**self.kwargs, **overrides}
            return self.to_loss(type(self).measure(fixed, moving, mask=mask, per_sample=True, **kwargs))
        per_mask = mask is not None and mask.dim() == fixed.dim() and mask.shape[0] == fixed.shape[0]
        return torch.stack([
            self.forward(fixed[n:n + 1], moving[n:n + 1], mask[n:n + 1] if per_mask else mask, **overrides)
            for n in range(fixed.shape[0])
        ])

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class MSELoss(SimilarityLoss):
    """Mean squared difference (squared intensity units), 0 at identity."""

    pointwise = True

    measure = staticmethod(L.mse)

    def __init__(self) -> None:
        super().__init__()

    def to_loss(self, value: Tensor) -> Tensor:
        return value


class NCCLoss(SimilarityLoss):
    """``1 - ncc`` in ``[0, 2]``."""

    pointwise = True

    measure = staticmethod(L.ncc)

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__(eps=eps)

    def to_loss(self, value: Tensor) -> Tensor:
        return 1 - value


class LNCCLoss(SimilarityLoss):
    """``1 - lncc`` in ``[0, 2]``; see :func:`regcore.losses.functional.lncc`."""

    measure = staticmethod(L.lncc)

    def __init__(
        self,
        window: Union[int, Sequence[int]] = 9,
        kernel: str = "box",
        sigma: Optional[Union[float, Sequence[float]]] = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(window=window, kernel=kernel, sigma=sigma, eps=eps)

    def to_loss(self, value: Tensor) -> Tensor:
        return 1 - value


class LocalCCLoss(SimilarityLoss):
    """``1 - cc`` in ``[0, 1]``: ANTs' local squared correlation with analytic gradients; see
    :mod:`regcore.losses.local_cc`. ``radius`` is the window half-size in voxels."""

    measure = staticmethod(local_cc)
    overlap_only = False
    batched_values = True

    def __init__(self, radius: int = 2, eps: float = 1e-5, exact: bool = True) -> None:
        super().__init__(radius=radius, eps=eps, exact=exact)

    def to_loss(self, value: Tensor) -> Tensor:
        return 1 - value


class SSIMLoss(SimilarityLoss):
    """``1 - ssim``; see :func:`regcore.losses.functional.ssim`."""

    measure = staticmethod(L.ssim)

    def __init__(
        self,
        sigma: Union[float, Sequence[float]] = 1.5,
        truncate: float = 3.5,
        data_range: Optional[float] = None,
        k1: float = 0.01,
        k2: float = 0.03,
    ) -> None:
        super().__init__(sigma=sigma, truncate=truncate, data_range=data_range, k1=k1, k2=k2)

    def to_loss(self, value: Tensor) -> Tensor:
        return 1 - value


class MILoss(SimilarityLoss):
    """``-mi`` (nats); see :func:`regcore.losses.functional.mutual_information`."""

    pointwise = True

    measure = staticmethod(L.mutual_information)

    def __init__(
        self,
        bins: int = 32,
        fixed_range: Optional[tuple[float, float]] = None,
        moving_range: Optional[tuple[float, float]] = None,
        kernel_sigma: Optional[float] = None,
        num_samples: Optional[int] = None,
        seed: int = 0,
        eps: float = 1e-10,
    ) -> None:
        super().__init__(
            bins=bins,
            fixed_range=fixed_range,
            moving_range=moving_range,
            kernel_sigma=kernel_sigma,
            num_samples=num_samples,
            seed=seed,
            eps=eps,
        )

    def to_loss(self, value: Tensor) -> Tensor:
        return -value


class NMILoss(MILoss):
    """``-nmi`` in ``[-2, -1]``; see
    :func:`regcore.losses.functional.normalized_mutual_information`."""

    measure = staticmethod(L.normalized_mutual_information)


class NGFLoss(SimilarityLoss):
    """``1 - ngf`` in ``[0, 1]``; ``spacing`` ((x, y, z) order, mm) may be given per call."""

    measure = staticmethod(L.ngf)

    def __init__(
        self,
        spacing: Optional[Sequence[float]] = None,
        eps_fixed: Optional[float] = None,
        eps_moving: Optional[float] = None,
    ) -> None:
        super().__init__(spacing=spacing, eps_fixed=eps_fixed, eps_moving=eps_moving)

    def forward(
        self,
        fixed: Tensor,
        moving: Tensor,
        mask: Optional[Tensor] = None,
        spacing: Optional[Sequence[float]] = None,
        **overrides: Any,
    ) -> Tensor:
        """As :meth:`SimilarityLoss.forward`; ``spacing`` (if not None) replaces the stored one."""
        if spacing is not None:
            overrides["spacing"] = spacing
        return super().forward(fixed, moving, mask, **overrides)

    def to_loss(self, value: Tensor) -> Tensor:
        return 1 - value


LOSSES: dict[str, type[SimilarityLoss]] = {
    "mse": MSELoss,
    "ncc": NCCLoss,
    "lncc": LNCCLoss,
    "lcc": LocalCCLoss,
    "ssim": SSIMLoss,
    "mi": MILoss,
    "nmi": NMILoss,
    "ngf": NGFLoss,
}


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the loss registered under ``name`` (case-insensitive) with ``kwargs``.

    Raises:
        InputError: (a ValueError) for an unknown name; the message lists the valid ones.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in LOSSES:
        raise InputError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[key](**kwargs)
