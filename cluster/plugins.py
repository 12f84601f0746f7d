"""Worker plugin that initialises torch once per Dask worker (threads, device)."""

from __future__ import annotations

import logging
import os

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["TorchSetup", "PLUGIN_NAME"]

log = logging.getLogger(__name__)
PLUGIN_NAME = "cohortreg-torch"


class TorchSetup(WorkerPlugin):
    """Sets ``torch.set_num_threads(threads)`` and picks the worker's device at worker start.

    ``device="auto"`` takes ``cuda`` when the worker sees a GPU (one per worker: the ``local-gpu``
    profile gives each worker its own ``CUDA_VISIBLE_DEVICES``), else ``cpu``. The task reads the
    choice back through ``get_worker().plugins["cohortreg-torch"].device``.
    """

    name = PLUGIN_NAME

    def __init__(self, threads: int = 1, device: str = "auto"):
        self.threads = int(threads)
        self.requested = device
        self.device: str | None = None

    def setup(self, worker) -> None:  # noqa: ANN001 (distributed's Worker)
        import torch

        torch.set_num_threads(max(1, self.threads))
        os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))
        if self.requested == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = self.requested
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"worker {worker.address}: device {self.device!r} requested but CUDA is not available")
        log.info("worker %s: torch %s threads=%d device=%s", worker.address, torch.__version__, self.threads, self.device)
