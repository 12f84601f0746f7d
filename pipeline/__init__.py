"""pipeline: cohort manifest -> pairs -> Zarr ingest -> one Dask task per pair -> shared results store.

Knows Dask and Zarr, no registration maths (that is :mod:`regcore`). Entry points:
:func:`read_manifest`, :func:`make_pairs`, :func:`ingest`, :func:`run_pairs`, :func:`open_results`.
"""

from .analysis import open_results, status_counts, summary_table, verify_pair, worst_pairs
from .ingest import ingest
from .manifest import Subject, read_manifest
from .pairs import Pair, make_pairs
from .runner import RunSummary, run_pairs
from .store import read_field, read_warped_labels

__all__ = [
    "Subject", "read_manifest", "Pair", "make_pairs", "ingest", "run_pairs", "RunSummary", "open_results",
    "summary_table", "worst_pairs", "status_counts", "verify_pair", "read_field", "read_warped_labels",
]
