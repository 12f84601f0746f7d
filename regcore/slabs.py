"""Cache-sized slabs of large volumes.

Elementwise passes over a 1 mm brain field (three 29 MB channels) are bound by memory traffic when
each pass streams the whole volume. Separable work along one axis (a Gaussian's shifted adds, a
central difference) can instead run slab by slab, cut along another axis, so that all the passes
over one slab find it in the cache. Every voxel gets the same operations in the same order; only
the vectorised and the scalar code paths of an add may round apart (about 1e-7 relative).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

__all__ = ["SLAB_BYTES", "worth_slabs", "slab_ranges", "along_axis_in_slabs"]

SLAB_BYTES = 4 << 20  # about the share of the last-level cache one core can count on


def worth_slabs(x: torch.Tensor) -> bool:
    """Whether ``x`` (3D spatial, at least 4 dims in all) is on the CPU, large enough for slabs to
    pay (over 2 slabs: a 2 mm brain's field, 3 x 5 MB, gains about 6 % of a pair's time), and not
    being differentiated (the slabs write into views of a new tensor). On a GPU, slabs would only
    multiply kernel launches: whole-volume passes there."""
    return (x.device.type == "cpu" and x.dim() >= 4 and x.numel() * x.element_size() > 2 * SLAB_BYTES
            and not (x.requires_grad and torch.is_grad_enabled()))


def slab_ranges(x: torch.Tensor, across: int) -> Iterator[tuple[int, int]]:
    """``(start, width)`` of the slabs of ``x`` cut along dim ``across``, each about
    ``SLAB_BYTES`` (at least one index wide)."""
    n = x.shape[across]
    width = max(1, int(SLAB_BYTES // max(1, x.numel() // n * x.element_size())))
    for start in range(0, n, width):
        yield start, min(width, n - start)


def along_axis_in_slabs(x: torch.Tensor, dim: int, first: int,
                        write: Callable[[torch.Tensor, torch.Tensor], object]) -> torch.Tensor:
    """A new tensor like ``x`` filled by ``write(x_slab, out_slab)`` for work along ``dim`` that
    needs no neighbours across the cut: slabs cut along the outermost spatial dim other than
    ``dim`` (``first`` is the first spatial dim)."""
    across = first if dim != first else first + 1
    out = torch.empty_like(x)
    for start, width in slab_ranges(x, across):
        write(x.narrow(across, start, width), out.narrow(across, start, width))
    return out
