"""Regularisers as :class:`torch.nn.Module` wrappers of :mod:`regcore.regularizers.functional`.

Every module returns a 0-dim tensor to *minimise* (all regularisers are non-negative and 0, or
``eps`` for the smoothed TV, for a constant field). The constructor stores the measure-specific
keyword arguments; ``forward(u, spacing=None, direction=None, mask=None)`` passes the geometry
and the mask on to the functional, ignoring the arguments the measure does not use (e.g.
``direction`` for the rotation-invariant ones). Shapes and conventions are those of
:mod:`regcore.regularizers.functional`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

from torch import Tensor, nn

from regcore.errors import InputError
import regcore.regularizers.functional as R

__all__ = [
    "Regularizer",
    "DiffusionRegularizer",
    "TVRegularizer",
    "AnisotropicTVRegularizer",
    "SparsityRegularizer",
    "BendingEnergyRegularizer",
    "JacobianRegularizer",
    "REGULARIZERS",
    "build_regularizer",
]


class Regularizer(nn.Module):
    """Base class: stores functional keyword arguments and calls the functional.

    Subclasses set ``measure`` (the functional) and ``uses`` (which of ``spacing``,
    ``direction``, ``mask`` it accepts).
    """

    measure: Callable[..., Tensor]
    uses: tuple[str, ...] = ("spacing", "mask")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs: dict[str, Any] = dict(kwargs)

    def forward(
        self,
        u: Tensor,
        spacing: Optional[Sequence[float]] = None,
        direction: Optional[Any] = None,
        mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Regularisation value of the field ``u``.

        Args:
            u: Displacement or velocity field ``(N, D, *spatial)``, components ``(x, y[, z])``
                in mm.
            spacing: Voxel size in mm, ``(x, y[, z])`` order (ignored by measures without
                derivatives).
            direction: ``D x D`` direction matrix (used only by :class:`JacobianRegularizer`).
            mask: Optional weights broadcastable to ``(N, 1, *spatial)``.

        Returns:
            0-dim tensor to minimise.
        """
        given = {"spacing": spacing, "direction": direction, "mask": mask}
        args = {name: given[name] for name in type(self).uses}
        return type(self).measure(u, **args, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class DiffusionRegularizer(Regularizer):
    """Mean squared Frobenius norm of the Jacobian; see
    :func:`regcore.regularizers.functional.diffusion`."""

    measure = staticmethod(R.diffusion)

    def __init__(self) -> None:
        super().__init__()


class TVRegularizer(Regularizer):
    """Isotropic (vectorial) total variation; see
    :func:`regcore.regularizers.functional.total_variation`."""

    measure = staticmethod(R.total_variation)

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__(eps=eps)


class AnisotropicTVRegularizer(Regularizer):
    """Anisotropic total variation; see
    :func:`regcore.regularizers.functional.total_variation_anisotropic`."""

    measure = staticmethod(R.total_variation_anisotropic)

    def __init__(self) -> None:
        super().__init__()


class SparsityRegularizer(Regularizer):
    """L1 norm of the field (mm); see :func:`regcore.regularizers.functional.sparsity`."""

    measure = staticmethod(R.sparsity)
    uses = ("mask",)

    def __init__(self) -> None:
        super().__init__()


class BendingEnergyRegularizer(Regularizer):
    """Mean squared Frobenius norm of the Hessian; see
    :func:`regcore.regularizers.functional.bending_energy`."""

    measure = staticmethod(R.bending_energy)

    def __init__(self) -> None:
        super().__init__()


class JacobianRegularizer(Regularizer):
    """Folding penalty ``relu(eps - det(I + du/dx))^2``; see
    :func:`regcore.regularizers.functional.folding_penalty`."""

    measure = staticmethod(R.folding_penalty)
    uses = ("spacing", "direction", "mask")

    def __init__(self, eps: float = 0.0) -> None:
        super().__init__(eps=eps)


REGULARIZERS: dict[str, type[Regularizer]] = {
    "diffusion": DiffusionRegularizer,
    "tv": TVRegularizer,
    "tv_aniso": AnisotropicTVRegularizer,
    "l1": SparsityRegularizer,
    "bending": BendingEnergyRegularizer,
    "jacobian": JacobianRegularizer,
}


def build_regularizer(name: str, **kwargs: Any) -> Regularizer:
    """Instantiate the regulariser registered under ``name`` (case-insensitive) with ``kwargs``.

    Raises:
        InputError: (a ValueError) for an unknown name; the message lists the valid ones.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in REGULARIZERS:
        raise InputError(
            f"unknown regularizer {name!r}; valid names: {', '.join(sorted(REGULARIZERS))}"
        )
    return REGULARIZERS[key](**kwargs)
