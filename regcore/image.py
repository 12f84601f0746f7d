"""``Image``: a tensor together with the :class:`~regcore.grid.Grid` that places it in the world."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .grid import Grid

__all__ = ["Image"]


@dataclass
class Image:
    """A sampled image: ``data`` of shape ``(C, *grid.shape)`` (channels first, spatial ``(Z, Y, X)``).

    ``C`` is 1 for intensity images and label maps, ``D`` for displacement fields (channels are the
    world ``(x, y, z)`` components in mm). The device of ``data`` decides where computations run.
    """

    data: torch.Tensor
    grid: Grid

    def __post_init__(self) -> None:
        if not isinstance(self.data, torch.Tensor):
            self.data = torch.as_tensor(np.asarray(self.data))
        if self.data.dim() == self.grid.ndim:
            self.data = self.data.unsqueeze(0)
        if tuple(self.data.shape[1:]) != self.grid.shape:
            raise InputError(
                f"image data shape {tuple(self.data.shape)} does not match grid shape "
                f"(C, {', '.join(map(str, self.grid.shape))})"
            )

    @property
    def ndim(self) -> int:
        """Spatial dimension ``D``."""
        return self.grid.ndim

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def batch(self) -> torch.Tensor:
        """The data with a leading batch dimension: ``(1, C, *shape)``."""
        return self.data.unsqueeze(0)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Image":
        return Image(self.data.to(device=device, dtype=dtype), self.grid)

    def with_data(self, data: torch.Tensor) -> "Image":
        """Same grid, new data (``(C, *shape)``)."""
        return Image(data, self.grid)

    def numpy(self) -> np.ndarray:
        """Data as a numpy array ``(C, *shape)`` on the CPU."""
        return self.data.detach().cpu().numpy()

    def check_finite(self, name: str = "image") -> None:
        """Raise :class:`InputError` naming ``name`` when the data holds NaN or infinity."""
        finite = torch.isfinite(self.data)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise InputError(f"{name}: {bad} of {self.data.numel()} voxels are NaN or infinite")
