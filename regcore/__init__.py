"""regcore: PyTorch autograd registration of one image pair, in physical space, on CPU or GPU.

Usable alone (``from regcore import register``); knows nothing of Dask or Zarr.
The coordinate convention is documented in :mod:`regcore.grid`.
"""

from .errors import CohortregError, InfrastructureError, InputError, RegistrationError
from .grid import Grid
from .image import Image
from .io import read_image, write_image
from .methods import available_methods, method_config
from .registration import RegistrationFailure, RegistrationResult, register
from .batch import register_batch

__version__ = "0.1.0"

__all__ = [
    "Grid",
    "Image",
    "read_image",
    "write_image",
    "register",
    "register_batch",
    "RegistrationResult",
    "RegistrationFailure",
    "method_config",
    "available_methods",
    "CohortregError",
    "InputError",
    "RegistrationError",
    "InfrastructureError",
    "__version__",
]
