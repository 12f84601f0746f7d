"""Images on different grids sampled in one batched ``grid_sample`` call.

The B moving images of a batch of pairs may differ in size. :class:`MovingStack` replicate-pads
them (at the far end of each axis) to a common array shape, the largest per axis, and converts
each pair's normalised coordinates *of its own grid* to that array: per axis,
``n' = (n + 1) (N_b - 1) / (N - 1) - 1`` (``align_corners=True``). Inside its own box a pair
samples exactly its own voxels; outside it, border clamping and replication give the same value
as clamping at its own border. So sampling through the stack equals sampling each image alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .grid import Grid
from .image import Image
from .sampling import GRID_SAMPLE_MODES, Mode, Padding, interpolate_linear, ramp_weight

__all__ = ["MovingStack"]


class MovingStack:
    """B images (any grids of one dimension) as one padded ``(B, C, *shape)`` tensor.

    Args:
        images: the images; ``None`` entries (e.g. pairs without a moving mask) become a
            constant ``fill`` on the largest shape.
        fill: value of the ``None`` entries.

    Coordinates given to :meth:`sample` and :meth:`inside_weight` are ``(B', *out, D)``
    normalised coordinates of each pair's own grid (``(x, y[, z])`` last); ``index`` selects the
    ``B'`` pairs (rows of the stack) they belong to.
    """

    def __init__(self, images: Sequence[Image | None], grids: Sequence[Grid] | None = None, fill: float = 1.0) -> None:
        present = [im for im in images if im is not None]
        if not present:
            raise ValueError("MovingStack needs at least one image")
        nd = present[0].ndim
        self.grids = list(grids) if grids is not None else [im.grid for im in images]  # type: ignore[union-attr]
        shape = tuple(max(g.shape[i] for g in self.grids) for i in range(nd))  # tensor (z, y, x) order
        channels = present[0].channels
        ref = present[0].data
        parts = []
        for im, grid in zip(images, self.grids):
            if im is None:
                parts.append(ref.new_full((1, channels, *shape), fill))
                continue
            pads: list[int] = []
            for i in reversed(range(nd)):  # F.pad lists the last dim first
                pads += [0, shape[i] - im.data.shape[1 + i]]
            x = im.data[None]
            parts.append(F.pad(x, pads, mode="replicate") if any(pads) else x)
        self.data = torch.cat(parts) if len(parts) > 1 else parts[0]
        size = tuple(reversed(shape))  # ITK (x, y[, z]) order
        self.padded = any(g.size != size for g in self.grids)
        self.scale = torch.as_tensor(
            [[(n - 1) / (m - 1) if m > 1 else 1.0 for n, m in zip(g.size, size)] for g in self.grids],
            dtype=self.data.dtype, device=self.data.device)  # (B, D)
        self.sizes = torch.as_tensor([list(g.size) for g in self.grids], dtype=self.data.dtype, device=self.data.device)

    def __len__(self) -> int:
        return self.data.shape[0]

    def _rows(self, t: torch.Tensor, index: Sequence[int] | None, like: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of a per-pair ``(B, D)`` table, shaped to broadcast against ``like``."""
        rows = t if index is None or len(index) == len(self) else t[list(index)]
        return rows.reshape(rows.shape[0], *([1] * (like.dim() - 2)), rows.shape[1]).to(like.dtype)

    def sample(self, coords: torch.Tensor, index: Sequence[int] | None = None, mode: Mode = "linear",
               padding: Padding = "zeros", deterministic: bool = False) -> torch.Tensor:
        """The pairs' images at their own normalised ``coords`` ``(B', *out, D)`` -> ``(B', C, *out)``.

        ``*out`` must have ``D`` dims (a grid, or a point set shaped ``(1, [1,] M)``). A stack of
        one image serves any number of coordinate sets. With
        ``padding="zeros"`` a point outside a pair's own box but inside the padded array reads the
        replicated border: callers that need zeros there mask by :meth:`inside_weight`.
        ``deterministic``: linear interpolation by :func:`regcore.sampling.interpolate_linear`,
        whose coordinate gradient needs no atomics on CUDA.
        """
        if mode not in GRID_SAMPLE_MODES:
            raise ValueError(f"unknown interpolation mode {mode!r}; use 'linear' or 'nearest'")
        data = self.data if index is None or len(index) == len(self) else self.data[list(index)]
        if data.shape[0] == 1 and coords.shape[0] > 1:  # one image (a shared fixed) for every pair
            data = data.expand(coords.shape[0], *data.shape[1:])
        grid = coords.to(data.dtype)
        if self.padded:
            grid = (grid + 1) * self._rows(self.scale, index, grid) - 1
        if deterministic and mode == "linear":
            return interpolate_linear(data, grid, padding)
        return F.grid_sample(data, grid, mode=GRID_SAMPLE_MODES[mode], padding_mode=padding, align_corners=True)

    def inside_weight(self, coords: torch.Tensor, index: Sequence[int] | None = None, ramp_vox: float = 0.5) -> torch.Tensor:
        """:func:`regcore.sampling.inside_weight` of each pair in its own grid: ``(B', *out)``,
        1 inside, falling to 0 over the last ``ramp_vox`` voxels (not differentiated)."""
        c = coords.detach()
        return ramp_weight(c, self._rows(self.sizes, index, c), ramp_vox)
