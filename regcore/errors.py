"""The project's one exception hierarchy (regcore is the bottom layer, so it lives here).

* :class:`InputError` -- the caller's data or configuration is wrong (missing or unreadable file,
  wrong dimension, NaNs, no overlap, invalid config). Also a :class:`ValueError`.
* :class:`RegistrationError` -- the inputs were valid but the optimisation failed (non-finite loss,
  diverged transform). Also a :class:`RuntimeError`.
* :class:`InfrastructureError` -- the machinery around a registration failed (device, storage,
  cluster). Also a :class:`RuntimeError`.

Messages always name the file or pair concerned and say what is wrong.
"""

from __future__ import annotations


class CohortregError(Exception):
    """Base class of every error raised on purpose by cohortreg."""


class InputError(CohortregError, ValueError):
    """Bad input: a file, an image or a configuration that cannot be used as given."""


class RegistrationError(CohortregError, RuntimeError):
    """The registration itself failed (for example the loss became NaN)."""


class InfrastructureError(CohortregError, RuntimeError):
    """Devices, storage or the cluster failed; the inputs may be fine."""
