"""cluster: named profiles -> a Dask ``Client`` (local, local-gpu, slurm, an existing scheduler)."""

from .plugins import TorchSetup
from .profiles import ClusterHandle, load_profiles, open_client, profile_settings, start_cluster

__all__ = ["TorchSetup", "ClusterHandle", "load_profiles", "open_client", "profile_settings", "start_cluster"]
