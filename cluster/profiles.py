"""Cluster profiles -> a ``distributed.Client``. Dask distributed is the engine; nothing here schedules.

Profiles (``profiles.yaml`` beside this module, or a user YAML with the same structure):

- ``local`` (default): ``LocalCluster`` of worker processes, one task at a time per worker
  (``slots``), torch threads set so that workers x threads = cores; ``resources`` (e.g.
  ``{"GPU": 1}``) are declared by every worker.
- ``local-gpu``: one worker process per visible GPU, each with its own ``CUDA_VISIBLE_DEVICES``
  and the abstract resource ``GPU=1`` (GPU tasks ask for ``resources={"GPU": 1}``).
- ``slurm``: ``dask_jobqueue.SLURMCluster`` with ``--gres=gpu:1`` and ``--resources GPU=1``.
- ``address``: connect to a running scheduler.

Every profile may set ``batch_size`` (pairs sharing a fixed image registered together in one
task: a number, or ``auto``; ``local`` 1, ``local-gpu`` and ``slurm`` auto): the default of
``cohortreg run --batch-size`` (:attr:`ClusterHandle.batch_size`).

Torch is initialised once per worker by :class:`cluster.plugins.TorchSetup`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from regcore import InfrastructureError, InputError

from .plugins import TorchSetup

__all__ = ["load_profiles", "profile_settings", "ClusterHandle", "start_cluster", "open_client", "gpu_count"]

log = logging.getLogger(__name__)
PROFILES_FILE = Path(__file__).with_name("profiles.yaml")


def load_profiles(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Built-in profiles, updated by those of a user YAML file (``path``)."""
    profiles = yaml.safe_load(PROFILES_FILE.read_text())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"cluster config {str(p)!r}: no such file")
        user = yaml.safe_load(p.read_text()) or {}
        if not isinstance(user, dict):
            raise InputError(f"cluster config {str(p)!r}: must map profile names to settings")
        for name, settings in user.items():
            profiles[name] = {**profiles.get(name, {}), **(settings or {})}
    return profiles


def gpu_count() -> int:
    """GPUs visible to this process (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover
        return 0


def profile_settings(name: str = "local", path: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """A profile's settings with ``auto`` values resolved and ``overrides`` (not None) applied."""
    profiles = load_profiles(path)
    if name not in profiles:
        raise InputError(f"unknown cluster profile {name!r}; available: {', '.join(sorted(profiles))}")
    s = {**profiles[name], **{k: v for k, v in overrides.items() if v is not None}}
    cores = os.cpu_count() or 1
    if s.get("workers", None) == "auto":
        s["workers"] = max(1, cores // 2)
    if s.get("threads") == "auto":
        s["threads"] = max(1, cores // int(s.get("workers") or 1))
    if s.get("memory_limit") == "auto":
        s["memory_limit"] = "auto"
    return s


@dataclass
class ClusterHandle:
    """A started cluster (or None for ``address``) and its client."""

    client: Any
    cluster: Any
    settings: dict[str, Any]

    @property
    def dashboard_link(self) -> str:
        return str(getattr(self.client, "dashboard_link", "") or "")

    @property
    def batch_size(self) -> int | str:
        """The profile's ``batch_size`` (1 when it sets none)."""
        return self.settings.get("batch_size") or 1

    @property
    def gpu(self) -> bool:
        return self.settings.get("kind") in ("local-gpu", "slurm") or str(self.settings.get("device")).startswith("cuda")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()


# Registrations are long tasks: the scheduler hands a worker a new pair only when it has a free
# slot (no pre-fetching), so a worker that dies takes no innocent queued pair with it.
SCHEDULER_CONFIG = {"distributed.scheduler.worker-saturation": 1.0}


def _local(s: dict[str, Any]):
    import dask
    from distributed import LocalCluster

    with dask.config.set(SCHEDULER_CONFIG):
        return LocalCluster(n_workers=int(s["workers"]), threads_per_worker=int(s.get("slots", 1)), processes=True,
                            memory_limit=s.get("memory_limit", "auto"), dashboard_address=s.get("dashboard", ":0"),
                            resources=s.get("resources"))


def _local_gpu(s: dict[str, Any]):
    from distributed import Nanny, Scheduler, SpecCluster

    n = int(s.get("workers") or gpu_count())
    if n < 1:
        raise InfrastructureError("profile local-gpu: no CUDA device visible (use the local profile on CPU)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(n)]
    workers = {
        f"gpu-{i}": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1},
                                              "env": {"CUDA_VISIBLE_DEVICES": ids[i % len(ids)]}}}
        for i in range(n)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": s.get("dashboard", ":0")}}
    import dask

    with dask.config.set(SCHEDULER_CONFIG):
        return SpecCluster(workers=workers, scheduler=scheduler)


def _slurm(s: dict[str, Any], scale: bool = True):
    """A ``SLURMCluster`` from the profile's settings; ``scale`` submits ``jobs`` jobs (sbatch)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise InfrastructureError("profile slurm needs dask-jobqueue: pip install dask-jobqueue") from exc
    keys = ("cores", "memory", "walltime", "queue", "account", "job_extra_directives", "worker_extra_args",
            "processes", "local_directory", "job_script_prologue")
    cluster = SLURMCluster(**{k: s[k] for k in keys if k in s})
    if scale:
        cluster.scale(jobs=int(s.get("jobs", 1)))
    return cluster


def start_cluster(profile: str = "local", path: str | Path | None = None, **overrides: Any) -> ClusterHandle:
    """Start the profile's cluster, connect a client and register the torch worker plugin."""
    from distributed import Client

    s = profile_settings(profile, path, **overrides)
    kind = s.get("kind", profile)
    try:
        if kind == "local":
            cluster = _local(s)
        elif kind == "local-gpu":
            cluster = _local_gpu(s)
        elif kind == "slurm":
            cluster = _slurm(s)
        elif kind == "address":
            if not s.get("address"):
                raise InputError("profile address needs --address tcp://HOST:PORT")
            cluster = None
        else:
            raise InputError(f"cluster profile {profile!r}: unknown kind {kind!r}")
        client = Client(cluster if cluster is not None else s["address"])
    except (InputError, InfrastructureError):
        raise
    except Exception as exc:
        raise InfrastructureError(f"cannot start cluster profile {profile!r}: {type(exc).__name__}: {exc}") from exc
    threads = s.get("threads", 1)
    if threads == "auto":
        threads = 1
    client.register_plugin(TorchSetup(threads=int(threads), device=str(s.get("device", "auto"))), name="cohortreg-torch")
    log.info("cluster %s: %s", profile, client.dashboard_link)
    return ClusterHandle(client, cluster, s)


@contextlib.contextmanager
def open_client(profile: str = "local", path: str | Path | None = None, **overrides: Any) -> Iterator[ClusterHandle]:
    """``with open_client("local", workers=2) as h: h.client.submit(...)``; closes on exit."""
    handle = start_cluster(profile, path, **overrides)
    try:
        yield handle
    finally:
        handle.close()
