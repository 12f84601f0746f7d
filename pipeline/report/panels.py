"""Per-pair image panels: one PNG per pair with, in three orthogonal slices through the centre,

1. the fixed image with the contours of the moving labels warped onto it (or, without labels,
   iso-intensity contours of the warped moving image), and
2. the Jacobian determinant of ``x -> x + u(x)`` (computed by :mod:`regcore` from the stored
   field; log scale from 0.5 to 2, blue = compression, red = expansion, black = folding),

each slice with its anatomical edge letters (see :mod:`.orientation`) and the same mm per pixel.
Pillow (a dependency of bokeh) draws and encodes it; no maths beyond colour mapping lives here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from bokeh.palettes import Category10_10, RdBu11, interp_palette
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from regcore import Grid, Image
from regcore.regularizers import jacobian_determinant
from regcore.pair_metrics import warp

from ..store import open_root, read_field, read_warped_labels
from ..zarrio import read_image_array
from .orientation import PlaneView, plane_views, take_slice

__all__ = ["PairImages", "load_pair_images", "render_panel", "jacobian_map", "JAC_RANGE"]

TILE_PX = 200          # the longest side over the three slices, in pixels
JAC_RANGE = (0.5, 2.0)  # colour scale of the Jacobian determinant (log scale, clipped)
_LET = 14              # margin for the edge letters
_TITLE = 16
_BAR_W = 76
_INK = (40, 40, 40)
_JAC_COLOURS = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in interp_palette(RdBu11, 255)],
                        dtype=np.uint8)
_LABEL_COLOURS = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in Category10_10], dtype=np.uint8)


@dataclass
class PairImages:
    """What a pair's panel shows, all on the field's (fixed) grid, arrays in ``(z, y, x)`` order."""

    grid: Grid
    fixed: np.ndarray | None
    contours: np.ndarray | None       # integer map whose region boundaries are drawn
    contour_kind: str                 # "labels" | "intensity" | ""
    jacobian: np.ndarray
    notes: list[str] = field(default_factory=list)


def jacobian_map(displacement: Image) -> np.ndarray:
    """Jacobian determinant of ``x + u(x)`` on the field's grid (regcore's finite differences)."""
    grid = displacement.grid
    direction = torch.as_tensor(grid.direction_matrix, dtype=torch.float64)
    det = jacobian_determinant(displacement.data.to(torch.float64)[None], spacing=grid.spacing, direction=direction)
    return det[0].numpy()


def _stored_image(root: zarr.Group, key: str) -> Image | None:
    path = f"images/{key}/image/0"
    return read_image_array(root[path]) if path in root else None


def _on_grid(image: Image, grid: Grid) -> np.ndarray:
    """``image`` sampled (linearly) at ``grid``'s voxel centres."""
    if image.grid == grid:
        return image.data[0].numpy()
    return warp(image, Image(torch.zeros((grid.ndim, *grid.shape)), grid)).data[0].numpy()


def load_pair_images(store: str | Path, index: int, fixed_key: str, moving_key: str) -> PairImages:
    """Read what :func:`render_panel` needs for a complete pair of ``store``."""
    disp = read_field(store, index)
    grid = disp.grid
    notes: list[str] = []
    root = open_root(store, "r")  # never stale metadata
    fixed_img = _stored_image(root, fixed_key)
    fixed = _on_grid(fixed_img, grid) if fixed_img is not None else None
    if fixed is None:
        notes.append(f"fixed image {fixed_key!r} is not in the store's images group: image slices skipped")
    labels = read_warped_labels(store, index)
    contours, kind = None, ""
    if labels is not None:
        contours, kind = labels.data[0].numpy(), "labels"
    elif fixed is not None:
        moving = _stored_image(root, moving_key)
        if moving is None:
            notes.append(f"no labels and moving image {moving_key!r} not in the store: no contours")
        else:
            warped = warp(moving, disp).data[0].numpy()
            levels = np.percentile(warped[warped > warped.min()], [50, 75, 90]) if np.ptp(warped) > 0 else []
            contours, kind = np.digitize(warped, levels).astype(np.int32), "intensity"
            notes.append("no labels: contours of the warped moving image at its 50/75/90th intensity percentiles")
    return PairImages(grid, fixed, contours, kind, jacobian_map(disp), notes)


# ------------------------------------------------------------------ drawing
_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _font(size: int = 12) -> _Font:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _resize(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """``arr`` (2D) resized to ``size`` = (height, width); integer maps keep their dtype (nearest)."""
    integer = np.issubdtype(arr.dtype, np.integer)
    img = PILImage.fromarray(np.ascontiguousarray(arr, dtype=np.int32 if integer else np.float32))  # mode I / F
    resample = PILImage.Resampling.NEAREST if nearest or integer else PILImage.Resampling.BILINEAR
    return np.asarray(img.resize((size[1], size[0]), resample))


def _gray(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    g = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _draw_contours(rgb: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """Boundaries of each nonzero region of ``regions`` drawn in its colour (1 px, inside)."""
    out = rgb.copy()
    padded = np.pad(regions, 1, mode="edge")
    for v in np.unique(regions):
        if v <= 0:
            continue
        m = padded == v
        interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        edge = m[1:-1, 1:-1] & ~interior
        out[edge] = _LABEL_COLOURS[(int(v) - 1) % len(_LABEL_COLOURS)]
    return out


def _jac_rgb(det: np.ndarray) -> np.ndarray:
    lo, hi = np.log2(JAC_RANGE)
    t = np.clip((np.log2(np.where(det > 0, det, 1.0)) - lo) / (hi - lo), 0.0, 1.0)
    rgb = _JAC_COLOURS[np.round(t * (len(_JAC_COLOURS) - 1)).astype(int)]
    rgb[det <= 0] = 0
    rgb[~np.isfinite(det)] = 255
    return rgb


def _tile_sizes(grid: Grid, views: list[PlaneView], shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    extent = [(s[0] * v.pixel_mm[0], s[1] * v.pixel_mm[1]) for v, s in zip(views, shapes)]
    scale = TILE_PX / max(max(e) for e in extent)
    return [(max(1, round(h * scale)), max(1, round(w * scale))) for h, w in extent]


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: _Font, anchor: str = "mm") -> None:
    draw.text(xy, text, fill=_INK, font=font, anchor=anchor)


def render_panel(images: PairImages) -> bytes | None:
    """The pair's PNG: a row of fixed-image slices with contours (when the fixed image is there)
    and a row of Jacobian determinant slices with its colour bar. None if nothing to show."""
    views = plane_views(images.grid)
    shapes = [take_slice(images.jacobian, v).shape for v in views]
    sizes = _tile_sizes(images.grid, views, shapes)
    rows: list[tuple[str, list[np.ndarray]]] = []
    if images.fixed is not None:
        lo, hi = np.percentile(images.fixed, [1, 99.5])
        tiles = []
        for v, size in zip(views, sizes):
            rgb = _gray(_resize(take_slice(images.fixed, v), size, nearest=False), lo, hi)
            if images.contours is not None:
                rgb = _draw_contours(rgb, _resize(take_slice(images.contours, v), size, nearest=True))
            tiles.append(rgb)
        what = {"labels": "fixed + warped moving labels", "intensity": "fixed + warped moving contours"}
        rows.append((what.get(images.contour_kind, "fixed"), tiles))
    rows.append(("Jacobian determinant of x + u(x)", [_jac_rgb(_resize(take_slice(images.jacobian, v), size, nearest=True))
                                         for v, size in zip(views, sizes)]))
    col_w = [w + 2 * _LET for _, w in sizes]
    tile_h = max(h for h, _ in sizes)
    row_h = 2 * _TITLE + 2 * _LET + tile_h
    width, height = sum(col_w) + _BAR_W, row_h * len(rows)
    canvas = PILImage.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(12), _font(11)
    for r, (what, tiles) in enumerate(rows):
        y0 = r * row_h
        _text(draw, (4, y0 + _TITLE / 2 + 1), what, font, anchor="lm")
        x0 = 0
        for v, tile, cw in zip(views, tiles, col_w):
            h, w = tile.shape[:2]
            tx, ty = x0 + _LET, y0 + 2 * _TITLE + _LET
            canvas.paste(PILImage.fromarray(tile), (tx, ty))
            draw.rectangle((tx - 1, ty - 1, tx + w, ty + h), outline=(190, 190, 190))
            _text(draw, (x0 + cw / 2, y0 + 1.5 * _TITLE), v.name, small)
            top, bottom, left, right = v.letters
            _text(draw, (tx + w / 2, ty - _LET / 2), top, font)
            _text(draw, (tx + w / 2, ty + h + _LET / 2), bottom, font)
            _text(draw, (tx - _LET / 2, ty + h / 2), left, font)
            _text(draw, (tx + w + _LET / 2, ty + h / 2), right, font)
            x0 += cw
        if what.startswith("Jacobian"):
            _colour_bar(canvas, draw, x0 + 6, y0 + 2 * _TITLE + _LET, tile_h, small)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _colour_bar(canvas: PILImage.Image, draw: ImageDraw.ImageDraw, x: int, y: int, h: int, font: _Font) -> None:
    """Vertical colour bar of the Jacobian map: 2 at the top, 1 in the middle, 0.5 at the bottom."""
    h = max(h - 18, 40)
    lo, hi = JAC_RANGE
    ramp = np.geomspace(hi, lo, h)[:, None].repeat(12, axis=1)
    canvas.paste(PILImage.fromarray(_jac_rgb(ramp)), (x, y))
    for frac, text in ((0.0, f">={hi:g}"), (0.5, "1"), (1.0, f"<={lo:g}")):
        _text(draw, (x + 16, y + frac * (h - 1)), text, font, anchor="lm")
    draw.rectangle((x, y + h + 6, x + 11, y + h + 16), fill=(0, 0, 0))
    _text(draw, (x + 16, y + h + 11), "<=0 fold", font, anchor="lm")
