"""The HTML report: outlier flags, orientation letters, Jacobian panels, and the acceptance test (a
cohort with one deliberately bad pair and one failed pair shows the bad pair flagged first), checked
statically (parsed HTML) and, where a Chromium exists, rendered in a real headless browser."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch

from cohortreg.cli import main as cohortreg
from conftest import FAST_METHOD, rotation_direction
from pipeline.analysis import open_results
from pipeline.ingest import ingest
from pipeline.manifest import read_manifest
from pipeline.pairs import make_pairs
from pipeline.report import axis_letters, flag_order, flag_pairs, plane_views, robust_z, take_slice
from pipeline.report.panels import PairImages, jacobian_map, load_pair_images, render_panel
from pipeline.runner import plan_pairs
from pipeline.store import mark_failed
from pipeline.task import register_pair
from regcore import Grid, Image, method_config

pytestmark = pytest.mark.usefixtures("single_thread")

BAD, FAILED = 2, 5  # pair indices of the demo cohort (8 subjects -> atlas)


# ------------------------------------------------------------------ flags
def test_robust_z_uses_median_mad_with_fallback_and_floor():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0, np.nan])
    z, med, s = robust_z(x)
    assert med == 3.0 and s == pytest.approx(1.4826 * 1.0)
    assert z[4] == pytest.approx(97 / s) and np.isnan(z[5])
    # more than half equal: MAD = 0, the mean absolute deviation takes over
    z, med, s = robust_z(np.array([0.0] * 7 + [0.05]))
    assert med == 0.0 and s == pytest.approx(1.2533 * 0.05 / 8) and z[-1] > 3.5
    # the floor keeps tiny spreads from flagging tiny differences
    z, _, s = robust_z(np.array([0.900, 0.901, 0.902, 0.903, 0.890]), floor=0.01)
    assert s == 0.01 and abs(z).max() < 3.5
    assert robust_z(np.array([2.0, 2.0, 2.0]))[0].tolist() == [0.0, 0.0, 0.0]


def test_flag_pairs_is_one_sided_and_needs_enough_pairs():
    ids = [f"p{i}" for i in range(8)]
    t = pd.DataFrame({"status": ["complete"] * 7 + ["failed"],
                      "dice_after": [0.90, 0.91, 0.92, 0.90, 0.91, 0.99 + 0.3, 0.60, np.nan],
                      "runtime_s": [60.0, 61, 59, 62, 60, 600, 1, np.nan]}, index=pd.Index(ids, name="pair_id"))
    flags, stats = flag_pairs(t)
    got = {(r.pair_id, r.metric, r.side) for r in flags.itertuples()}
    # a high Dice and a short runtime are not bad; a low Dice and a long runtime are
    assert got == {("p6", "dice_after", "low"), ("p5", "runtime_s", "high")}
    assert stats["dice_after"].lower is not None and stats["dice_after"].upper is None
    assert stats["dice_after"].n == 7  # the failed pair does not count
    assert flag_order(flags)[0] in ("p5", "p6") and set(flag_order(flags)) == {"p5", "p6"}
    assert flag_pairs(t.iloc[:4])[1] == {}  # fewer than 5 complete pairs: no judgement


# ------------------------------------------------------------------ orientation
def test_axis_letters_follow_the_direction_matrix_in_lps():
    assert axis_letters(np.eye(3)) == [("R", "L"), ("A", "P"), ("I", "S")]
    assert axis_letters(np.diag([-1.0, -1.0, 1.0])) == [("L", "R"), ("P", "A"), ("I", "S")]  # RAS-stored NIfTI
    # a sagittal acquisition: index x runs posterior->anterior, y superior->inferior, z right->left
    sag = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    assert axis_letters(sag) == [("P", "A"), ("S", "I"), ("R", "L")]
    assert axis_letters(rotation_direction(3, 20.0)) == [("R", "L"), ("A", "P"), ("I", "S")]  # nearest axis


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0]),
                                       np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
                                       rotation_direction(3, 20.0)])
def test_displayed_slices_put_the_letters_where_the_anatomy_is(direction):
    """World coordinates as images: on screen, the edge named S must hold the most superior voxels, etc."""
    grid = Grid((9, 11, 13), (1.0, 1.5, 2.0), (3.0, -4.0, 5.0), tuple(np.asarray(direction).ravel()))
    world = grid.world_points(dtype=torch.float64).numpy()  # (z, y, x, 3): LPS mm
    views = plane_views(grid)
    assert [v.name for v in views] == ["axial", "coronal", "sagittal"]
    toward = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
    for v in views:
        top, bottom, left, right = v.letters
        assert {top, bottom} != {left, right}
        for letter, edge in ((top, lambda a: a[0]), (bottom, lambda a: a[-1]), (left, lambda a: a[:, 0]),
                             (right, lambda a: a[:, -1])):
            axis, sign = toward[letter]
            plane = take_slice(world[..., axis], v) * sign
            assert edge(plane).mean() > plane.mean(), (v.name, letter)
        assert v.letters[0] in ("S", "A") and v.letters[2] in ("R", "A")


def test_2d_grid_has_one_slice():
    grid = Grid((6, 4), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    (view,) = plane_views(grid)
    assert view.letters == ("A", "P", "R", "L") and take_slice(np.zeros((4, 6)), view).shape == (4, 6)


# ------------------------------------------------------------------ Jacobian panel
def test_jacobian_map_is_regcores_determinant_and_folds_are_black():
    grid = Grid((12, 10, 8), (2.0, 1.0, 1.5), (0.0, 0.0, 0.0), tuple(rotation_direction(3, 30.0).ravel()))
    a = np.diag([0.5, -0.2, 0.1])  # u(p) = A p in world mm: det(I + A) everywhere
    pts = grid.world_points(dtype=torch.float64)
    u = torch.movedim(pts @ torch.as_tensor(a).T, -1, 0)
    det = jacobian_map(Image(u, grid))
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + a), rtol=1e-9)
    folded = det.copy()
    folded[:, :, :4] = -1.0
    png = render_panel(PairImages(grid, None, None, "", folded))
    from io import BytesIO

    from PIL import Image as PILImage

    rgb = np.asarray(PILImage.open(BytesIO(png)).convert("RGB"))
    assert (rgb.sum(-1) == 0).sum() > 100  # black folding region (and the legend swatch)


# ------------------------------------------------------------------ acceptance: a cohort with a bad pair
@pytest.fixture(scope="module")
def bad_cohort(tmp_path_factory, demo_cohort):
    """The demo cohort registered to the atlas: pair BAD barely iterates (1 iteration per level),
    pair FAILED is marked failed."""
    store = tmp_path_factory.mktemp("report") / "cohort.zarr"
    subs = read_manifest(demo_cohort)
    ingest(subs, store)
    pairs = make_pairs(subs, "atlas", atlas="atlas")
    plan_pairs(store, pairs, method_config(FAST_METHOD))
    bad = copy.deepcopy(FAST_METHOD)
    bad["name"] = "test-affine-1-iteration"
    bad["stages"][0]["pyramid"]["iterations"] = [1, 1]
    for i in range(len(pairs)):
        if i != FAILED:
            assert register_pair(store, i, bad if i == BAD else FAST_METHOD)["status"] == "complete"
    mark_failed(store, FAILED, "boom: the worker died")
    ids = [p.pair_id for p in pairs]
    return store, ids


class _Page(HTMLParser):
    """The parts of the report the tests look at."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[tuple[str, str]] = []    # (tag, id or text) of h2 and table, in document order
        self.rows: dict[str, list[dict]] = {}     # table id -> rows (attrs + text)
        self.srcs: list[str] = []                 # src/href of script, link, img
        self.roots: list[str] = []                # bokeh root divs
        self.scripts: list[str] = []
        self._table: str | None = None
        self._row: dict | None = None
        self._h2 = False
        self._script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h2":
            self._h2 = True
        elif tag == "table":
            self._table = a.get("id", "")
            self.order.append(("table", self._table))
            self.rows.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None and "data-pair" in a:
            self._row = {**a, "text": ""}
            self.rows[self._table].append(self._row)
        elif tag == "span" and self._row is not None and "data-metric" in a:
            self._row.setdefault("metrics", []).append(a["data-metric"])
        if tag in ("script", "link", "img"):
            for k in ("src", "href"):
                if a.get(k):
                    self.srcs.append(a[k])
            self._script = tag == "script"
        if tag == "div" and "data-root-id" in a:
            self.roots.append(a["data-root-id"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "tr":
            self._row = None
        elif tag == "h2":
            self._h2 = False
        elif tag == "script":
            self._script = False

    def handle_data(self, data):
        if self._h2:
            self.order.append(("h2", data.strip()))
        if self._row is not None:
            self._row["text"] += data
        if self._script:
            self.scripts.append(data)


def _check_report(text: str, ids: list[str]) -> _Page:
    page = _Page()
    page.feed(text)
    # the flagged table comes first: first section and first table
    assert page.order[0] == ("h2", "Flagged pairs") and page.order[1] == ("table", "flagged-pairs")
    rows = page.rows["flagged-pairs"]
    first = rows[0]
    assert first["data-pair"] == ids[BAD] and first["class"] == "outlier"
    assert {"dice_after", "ncc_after"} <= set(first["metrics"])
    assert "robust z" in first["text"]
    failed = [r for r in rows if r["class"] == "failed"]
    assert [r["data-pair"] for r in failed] == [ids[FAILED]] and "boom: the worker died" in failed[0]["text"]
    assert rows.index(failed[0]) > 0  # outliers first, then failures
    # the full table marks the same rows
    classes = {r["data-pair"]: r["class"] for r in page.rows["all-pairs-table"]}
    assert classes[ids[FAILED]] == "failed" and classes[ids[BAD]] == "outlier" and len(classes) == len(ids)
    # images (one PNG per pair shown) and plots (bokeh roots, their JSON inline)
    assert text.count("src='data:image/png;base64,") >= 2
    assert f"id='pair-{ids[BAD]}'><img alt='slices of {ids[BAD]}' src='data:image/png;base64," in text
    names = {"status", "dice_after", "ncc_after", "jac_min", "jac_nonpositive", "runtime_s", "dice_label_after"}
    assert len(page.roots) >= len(names)
    docs = "".join(page.scripts)
    for name in names:
        assert f'"name":"{name}"' in docs, name
    assert "Bokeh" in docs
    # self-contained: nothing loaded from the network
    assert not [s for s in page.srcs if re.match(r"(https?:)?//", s)], page.srcs
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=['\"](https?:)?//", text)
    return page


def test_report_flags_the_bad_pair_first(bad_cohort, tmp_path, capsys):
    store, ids = bad_cohort
    out = tmp_path / "report.html"
    t0 = time.perf_counter()
    assert cohortreg(["report", str(store), "--html", str(out), "--worst", "2", "--pair", ids[0],
                      "--pair", ids[FAILED]]) == 0
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0, f"report took {elapsed:.1f} s"
    printed = capsys.readouterr().out
    assert f"  {ids[BAD]}: " in printed and "flagged as outliers" in printed
    text = out.read_text(encoding="utf-8")
    page = _check_report(text, ids)
    # panels: the flagged pairs, the requested ones and the 2 worst; the failed pair has a note, no image
    shown = re.findall(r"<figure class='pair' id='pair-([^']+)'>", text)
    assert shown[0] == ids[BAD] and ids[0] in shown and ids[FAILED] in shown
    assert text.count("<img alt='slices of ") == text.count("src='data:image/png;base64,") == len(shown) - 1
    assert "status failed, no field to show" in text
    # captions and the run summary
    assert "Dice 0." in text and "NCC after" in text and "folding" in text
    assert "test-affine-1-iteration" in text and "test-affine /" in text and "versions:" in text
    assert open_results(store)["dice_after"].values[BAD] < 0.75  # the bad pair really is bad
    assert page.rows["flagged-pairs"][0]["data-pair"] == ids[BAD]


def test_report_notes_missing_fixed_image_and_missing_labels(bad_cohort, tmp_path):
    store, _ = bad_cohort
    copy_ = tmp_path / "copy.zarr"
    shutil.copytree(store, copy_)
    shutil.rmtree(copy_ / "warped_labels")
    images = load_pair_images(copy_, 0, "atlas", "sub-01")
    assert images.contour_kind == "intensity" and images.contours is not None and images.contours.max() >= 2
    assert render_panel(images)
    shutil.rmtree(copy_ / "images" / "atlas")
    images = load_pair_images(copy_, 0, "atlas", "sub-01")
    assert images.fixed is None and "not in the store's images group" in images.notes[0]
    assert render_panel(images)  # the Jacobian row alone


# ------------------------------------------------------------------ a real browser
_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { window.__errors.push(String(e.message)); });
</script>"""
_PROBE_END = """<script>
setTimeout(function () {
  var canvases = [], painted = 0;
  (function walk(root) {
    root.querySelectorAll('*').forEach(function (el) {
      if (el.tagName === 'CANVAS') canvases.push(el);
      if (el.shadowRoot) walk(el.shadowRoot);
    });
  })(document);
  canvases.forEach(function (c) {
    try {
      var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, n = 0;
      for (var i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && (d[i] < 240 || d[i + 1] < 240 || d[i + 2] < 240)) n++;
      if (n > 50) painted++;
    } catch (e) { window.__errors.push('canvas: ' + e); }
  });
  var imgs = Array.prototype.filter.call(document.images, function (im) { return im.complete && im.naturalWidth > 0; });
  var rows = Array.prototype.map.call(document.querySelectorAll('#flagged-pairs tbody tr'),
                                      function (r) { return [r.dataset.pair, r.className]; });
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({figures: document.querySelectorAll('.bk-Figure').length, painted: painted,
    images: imgs.length, rows: rows, errors: window.__errors});
  document.body.appendChild(pre);
}, 3000);
</script>"""


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium(bad_cohort, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium or Chrome on PATH (chromium, chromium-browser, google-chrome): the report is "
                    "checked statically only")
    store, ids = bad_cohort
    out = tmp_path / "report.html"
    assert cohortreg(["report", str(store), "--html", str(out), "--worst", "2"]) == 0
    text = out.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"  # the report plus a script that records what the browser rendered
    probe.write_text(text.replace("<head>", "<head>" + _PROBE, 1).replace("</body>", _PROBE_END + "</body>"), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--virtual-time-budget=10000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, encoding="utf-8", errors="replace", timeout=120,
                         check=False)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"no probe output; browser stderr: {dom.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["errors"] == []
    assert result["figures"] >= 7 and result["painted"] >= result["figures"]  # every plot drew on its canvas
    assert result["images"] == text.count("src='data:image/png;base64,") >= 2
    assert result["rows"][0] == [ids[BAD], "outlier"] and [ids[FAILED], "failed"] in result["rows"]
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, "--window-size=1300,2400", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 20_000
