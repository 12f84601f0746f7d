"""The HTML quality report of a results store (``cohortreg report STORE --html F``).

One self-contained file: flagged pairs first (robust-z outliers of the cohort, then failures),
the runs' provenance, cohort plots (bokeh, inline), and per pair three orthogonal slices of the
fixed image with the warped moving labels and of the Jacobian determinant. Modules:
:mod:`.flags` (outlier rules), :mod:`.orientation` (anatomical letters of a grid's axes),
:mod:`.panels` (pair images), :mod:`.plots` (bokeh figures), :mod:`.provenance` (run lines),
:mod:`.page` (the page).
"""

from .flags import FLAG_RULES, MetricStats, OutlierRule, flag_order, flag_pairs, robust_z
from .orientation import axis_letters, plane_views, take_slice
from .page import ReportContent, report_content, write_html_report

__all__ = [
    "write_html_report", "report_content", "ReportContent", "flag_pairs", "flag_order", "robust_z", "OutlierRule",
    "MetricStats", "FLAG_RULES", "axis_letters", "plane_views", "take_slice",
]
