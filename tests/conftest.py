"""Shared test fixtures: where the real data lives, devices, synthetic images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from regcore import Grid, Image

ROOT = Path(__file__).resolve().parents[1]
#: ../shared/data beside the checkout; COHORTREG_SHARED_DATA points elsewhere (e.g. a copy on a GPU machine).
SHARED_DATA = Path(os.environ.get("COHORTREG_SHARED_DATA", ROOT.parent / "shared" / "data"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, skipping the test with a reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def single_thread():
    """Run a module with one torch intra-op thread and restore the setting afterwards. For modules
    of tiny tensors or small volumes, where intra-op threads only add overhead (and stall when the
    CPU is shared). Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def blobs(shape: tuple[int, ...], n: int = 12, seed: int = 0, sigma: float = 0.12) -> np.ndarray:
    """A smooth random image (sum of Gaussian blobs), values in about [0, 1], tensor order."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    out = np.zeros(shape)
    for _ in range(n):
        c = rng.uniform(-0.6, 0.6, len(shape))
        s = sigma * rng.uniform(0.6, 1.6)
        out += rng.uniform(0.3, 1.0) * np.exp(-sum((a - ci) ** 2 for a, ci in zip(axes, c)) / (2 * s * s))
    return out / out.max()


def rotation_direction(dim: int, angle_deg: float = 20.0) -> np.ndarray:
    """A non-identity, non-axis-aligned direction matrix (a rotation)."""
    a = np.radians(angle_deg)
    if dim == 2:
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    return rz @ rx


def make_image(shape, spacing=None, origin=None, direction=None, seed=0, n=12) -> Image:
    """A blob image on a grid; ``shape`` in tensor order, geometry in ITK order."""
    grid = Grid(tuple(reversed(shape)), spacing, origin, direction)
    return Image(torch.from_numpy(blobs(tuple(shape), n=n, seed=seed)).float(), grid)


# ------------------------------------------------------------------ pipeline fixtures
# A small real-anatomy cohort (MNI152 from nilearn at 6 mm, random known diffeomorphisms) and a
# fast method config, shared by the pipeline tests.
FAST_METHOD = {
    "name": "test-affine",
    "stages": [{"transform": "affine", "objective": [{"measure": "ncc"}],
                "pyramid": {"factors": [2.0, 1.0], "iterations": [15, 10], "min_size": 4}}],
}


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    """Manifest of the demo cohort: atlas + 8 subjects at 6 mm (built once per session)."""
    from workflows.demo_cohort import make_demo_cohort

    return make_demo_cohort(tmp_path_factory.mktemp("cohort"), subjects=8, resolution=6.0)


@pytest.fixture(scope="session")
def local_client():
    """A LocalCluster of 4 single-threaded worker processes (with the torch worker plugin)."""
    from cluster.profiles import start_cluster

    handle = start_cluster("local", workers=4, threads=1)
    yield handle.client
    handle.close()
