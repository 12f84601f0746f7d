"""A small self-contained HTML quality report: the summary table and, per pair, before/after
checkerboards of the fixed image against the moving image (middle slice of each axis)."""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .analysis import open_results, summary_table, worst_pairs
from .store import read_field, read_layout
from .task import load_subject

__all__ = ["write_html_report", "checkerboard_png"]


def _slices(volume: np.ndarray) -> list[np.ndarray]:
    if volume.ndim == 2:
        return [volume]
    z, y, x = (s // 2 for s in volume.shape)
    return [volume[z], volume[:, y][::-1], volume[:, :, x][::-1]]


def _checker(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    yy, xx = np.indices(a.shape)
    mask = ((yy * tiles // max(a.shape[0], 1)) + (xx * tiles // max(a.shape[1], 1))) % 2 == 0
    return np.where(mask, a, b)


def checkerboard_png(fixed: np.ndarray, before: np.ndarray, after: np.ndarray) -> bytes:
    """PNG bytes: rows = slices, columns = checkerboard before | checkerboard after (8-bit)."""
    lo, hi = np.percentile(fixed, [1, 99])
    scale = lambda v: np.clip((v - lo) / max(hi - lo, 1e-6) * 255, 0, 255)  # noqa: E731
    rows = []
    for f, b, a in zip(_slices(fixed), _slices(before), _slices(after)):
        gap = np.full((f.shape[0], 4), 255.0)
        rows.append(np.hstack([_checker(scale(f), scale(b)), gap, _checker(scale(f), scale(a))]))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1])), constant_values=255) for r in rows]
    canvas = np.vstack(rows)
    if canvas.shape[1] < 400:  # small (coarse) images: enlarge for the eye
        canvas = np.kron(canvas, np.ones((2, 2)))
    img = sitk.GetImageFromArray(canvas.astype(np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.png"
        sitk.WriteImage(img, str(path))
        return path.read_bytes()


def _pair_images(store: str | Path, index: int) -> bytes:
    from regcore.sampling import sample_world

    layout = read_layout(store)
    pair = layout.pairs[index]
    fixed = load_subject(store, pair.fixed, "fixed")["image"]
    moving = load_subject(store, pair.moving, "moving")["image"]
    field = read_field(store, index)
    pts = field.grid.world_points(dtype=torch.float64)
    before = sample_world(moving, pts)[0].numpy()
    after = sample_world(moving, pts + torch.movedim(field.data.double(), 0, -1))[0].numpy()
    return checkerboard_png(fixed.data[0].numpy(), before, after)


def write_html_report(store: str | Path, out: str | Path, metric: str = "dice_after", max_pairs: int = 12) -> Path:
    """Write ``out`` (HTML): summary table, then images of the ``max_pairs`` worst complete pairs."""
    ds = open_results(store)
    table = summary_table(ds)
    parts = ["<html><head><meta charset='utf-8'><title>cohortreg report</title></head><body>",
             f"<h1>cohortreg results: {html.escape(str(store))}</h1>",
             f"<p>method {html.escape(str(ds.attrs.get('method')))}, config hash "
             f"{html.escape(str(ds.attrs.get('config_hash')))}</p>",
             table.to_html(float_format=lambda v: f"{v:.4g}"),
             f"<h2>Worst pairs by {html.escape(metric)}: checkerboard fixed/moving, before | after</h2>"]
    index = {pid: i for i, pid in enumerate(table.index)}
    for pid in worst_pairs(ds, metric, max_pairs).index:
        png = base64.b64encode(_pair_images(store, index[pid])).decode()
        parts.append(f"<h3>{html.escape(pid)}</h3><img src='data:image/png;base64,{png}'/>")
    parts.append("</body></html>")
    path = Path(out)
    path.write_text("\n".join(parts))
    return path
