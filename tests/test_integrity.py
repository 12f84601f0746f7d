"""Corrupt input is refused (issue 13): truncated files and NaN/inf voxels, in every format we parse.

SimpleITK alone reads a NIfTI file cut in half without an error (the missing voxels become 0) and
its NIfTI reader turns NaN/inf float voxels into 0, so these tests pin :mod:`regcore.integrity`
as called by :func:`regcore.read_image` and by ingest.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import zarr

from pipeline.ingest import ingest
from pipeline.manifest import read_manifest
from regcore import InputError, read_image
from regcore.integrity import check_file, count_nonfinite, file_digest, inflate, parse_nifti_header

SHAPE = (18, 22, 20)  # (z, y, x): a 20 x 22 x 18 image
NVOX = int(np.prod(SHAPE))
FLOAT_BYTES = NVOX * 4


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1.0, 2.0, SHAPE).astype(np.float32)


def _with_bad_voxels(arr: np.ndarray) -> np.ndarray:
    out = arr.copy()
    out[0, 0, :2] = np.nan
    out[5, 6, 7] = np.inf
    return out  # 3 non-finite voxels


def _write(path: Path, arr: np.ndarray, compress: bool = True) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path), useCompression=compress)
    return path


def _cut(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


# ------------------------------------------------------------------ intact files read fine
@pytest.mark.parametrize("name,compress", [("a.nii.gz", True), ("a.nii", False), ("a.mha", False),
                                           ("a.mha", True), ("a.mhd", True), ("a.nrrd", False),
                                           ("a.nrrd", True), ("a.hdr", False)])
def test_intact_files_read_fine(tmp_path, name, compress):
    arr = _volume()
    path = _write(tmp_path / name, arr, compress)
    check_file(path)
    np.testing.assert_array_equal(read_image(path).numpy()[0], arr)


def test_intact_integer_label_map_reads_with_its_own_type(tmp_path):
    lab = (_volume() > 1.5).astype(np.uint8) * 3
    path = _write(tmp_path / "lab.nii.gz", lab)
    back = read_image(path, dtype=None)
    assert not back.data.is_floating_point()
    np.testing.assert_array_equal(back.numpy()[0], lab)


# ------------------------------------------------------------------ truncated files
def test_truncated_nii_gz(tmp_path):
    path = _cut(_write(tmp_path / "a.nii.gz", _volume()))
    with pytest.raises(InputError) as err:
        read_image(path)
    msg = str(err.value)
    assert msg.startswith(f"image {str(path)!r}: truncated: the header declares {FLOAT_BYTES} bytes of voxel data, "
                          "the file holds ")
    held = int(re.search(r"the file holds (\d+) once decompressed", msg).group(1))
    assert 0 < held < FLOAT_BYTES
    assert "ends before its end marker" in msg


def test_truncated_nii(tmp_path):
    path = _write(tmp_path / "a.nii", _volume(), compress=False)
    size = path.stat().st_size
    _cut(path)
    held = size // 2 - 352  # the voxels start after the 348-byte header and 4 extension bytes
    with pytest.raises(InputError, match=re.escape(
            f"image {str(path)!r}: truncated: the header declares {FLOAT_BYTES} bytes of voxel data, "
            f"the file holds {held}")):
        read_image(path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_mha(tmp_path, compress):
    path = _cut(_write(tmp_path / "a.mha", _volume(), compress))
    with pytest.raises(InputError, match=re.escape(
            f"image {str(path)!r}: truncated: the header declares {FLOAT_BYTES} bytes of voxel data, the file holds")):
        read_image(path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_nrrd(tmp_path, compress):
    path = _cut(_write(tmp_path / "a.nrrd", _volume(), compress))
    with pytest.raises(InputError, match=re.escape(
            f"image {str(path)!r}: truncated: the header declares {FLOAT_BYTES} bytes of voxel data, the file holds")):
        read_image(path)


@pytest.mark.parametrize("header,data", [("a.mhd", "a.raw"), ("a.hdr", "a.img")])
def test_truncated_or_missing_separate_data_file(tmp_path, header, data):
    path = _write(tmp_path / header, _volume(), compress=False)
    _cut(tmp_path / data)
    with pytest.raises(InputError, match=re.escape(
            f"truncated: the header declares {FLOAT_BYTES} bytes of voxel data, the data file "
            f"{str(tmp_path / data)!r} holds {FLOAT_BYTES // 2}")):
        read_image(path)
    (tmp_path / data).unlink()
    with pytest.raises(InputError, match=f"{header}.*data file.*{data}.*does not exist"):
        read_image(path)


def test_gzip_cut_after_the_data_or_corrupt(tmp_path):
    data = _write(tmp_path / "a.nii.gz", _volume()).read_bytes()
    (tmp_path / "notrailer.nii.gz").write_bytes(data[:-8])  # only the CRC/size trailer is missing
    with pytest.raises(InputError, match=r"notrailer.nii.gz': truncated: .*ends before its end marker"):
        read_image(tmp_path / "notrailer.nii.gz")
    bad = bytearray(data)
    bad[-8] ^= 0xFF  # wrong CRC
    (tmp_path / "crc.nii.gz").write_bytes(bytes(bad))
    with pytest.raises(InputError, match=r"crc.nii.gz': corrupt compressed data"):
        read_image(tmp_path / "crc.nii.gz")
    (tmp_path / "tiny.nii").write_bytes(gzip.decompress(data)[:100])
    with pytest.raises(InputError, match=r"tiny.nii': truncated: the file holds 100 bytes, less than its 348-byte"):
        read_image(tmp_path / "tiny.nii")


def test_gzip_extra_members_and_trailing_bytes_are_accepted(tmp_path):
    raw = gzip.decompress(_write(tmp_path / "a.nii.gz", _volume()).read_bytes())
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]) + b"\0\0pad")
    check_file(tmp_path / "multi.nii.gz")
    np.testing.assert_array_equal(read_image(tmp_path / "multi.nii.gz").numpy()[0], _volume())


# ------------------------------------------------------------------ non-finite voxels
@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii", "a.hdr", "a.mha", "a.mhd", "a.nrrd"])
def test_nan_and_inf_voxels_are_refused(tmp_path, name):
    path = _write(tmp_path / name, _with_bad_voxels(_volume()), compress=not name.endswith((".nii", ".hdr")))
    with pytest.raises(InputError, match=re.escape(f"image {str(path)!r}: contains 3 NaN or infinite voxels")):
        read_image(path)


def test_nifti_nan_is_found_whatever_the_byte_order_and_scaling(tmp_path):
    def big_endian(arr: np.ndarray, name: str) -> Path:
        header = nib.Nifti1Header(endianness=">")
        header.set_data_dtype(np.float64)
        img = nib.Nifti1Image(arr, np.eye(4), header)
        img.header.set_slope_inter(2.0, 1.0)  # ITK applies it after reading
        nib.save(img, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:4] == (348).to_bytes(4, "big")
        return tmp_path / name

    with pytest.raises(InputError, match="be.nii': contains 3 NaN or infinite voxels"):
        read_image(big_endian(_with_bad_voxels(_volume()), "be.nii"))
    ok = read_image(big_endian(_volume(), "be_ok.nii")).numpy()[0]
    np.testing.assert_allclose(ok, 2.0 * _volume().transpose(2, 1, 0) + 1.0, rtol=1e-6)


def test_nifti2_header_is_parsed(tmp_path):
    nib.save(nib.Nifti2Image(_volume(), np.eye(4)), tmp_path / "n2.nii")
    hdr = parse_nifti_header((tmp_path / "n2.nii").read_bytes()[:540])
    assert hdr.version == 2 and hdr.dims == SHAPE and hdr.data_bytes == FLOAT_BYTES and hdr.vox_offset >= 544
    check_file(tmp_path / "n2.nii")
    with pytest.raises(InputError, match=f"truncated: the header declares {FLOAT_BYTES} bytes"):
        check_file(_cut(tmp_path / "n2.nii"))


def test_stream_helpers():
    payload = bytes(range(256)) * 50
    stream = gzip.compress(payload[:3000]) + gzip.compress(payload[3000:])
    assert b"".join(inflate([stream[i:i + 7] for i in range(0, len(stream), 7)], chunk_size=100)) == payload
    with pytest.raises(EOFError):
        b"".join(inflate([stream[:-20]]))
    with pytest.raises(zlib.error):
        b"".join(inflate([zlib.compress(payload)[:2] + b"\xff" * 40], wbits=15))
    assert count_nonfinite(np.array([1.0, np.nan, -np.inf])) == 2 and count_nonfinite(np.arange(3)) == 0


# ------------------------------------------------------------------ ingest
def test_ingest_refuses_corrupt_files_one_by_one_and_records_file_digests(tmp_path):
    good = _write(tmp_path / "good.nii.gz", _volume(1))
    _cut(_write(tmp_path / "cut.nii.gz", _volume(2)))
    _cut(_write(tmp_path / "cut.nii", _volume(3), compress=False))
    _write(tmp_path / "nan.nii", _with_bad_voxels(_volume(4)), compress=False)
    _write(tmp_path / "nan.mha", _with_bad_voxels(_volume(5)))
    manifest = tmp_path / "cohort.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "image"])
        w.writerows([["good", "good.nii.gz"], ["cutgz", "cut.nii.gz"], ["cutnii", "cut.nii"],
                     ["nannii", "nan.nii"], ["nanmha", "nan.mha"]])
    store = tmp_path / "cohort.zarr"
    report = ingest(read_manifest(manifest), store, client=None)
    status = {r["key"]: r["status"] for r in report.results}
    errors = {r["key"]: r["error"] for r in report.results}
    assert status == {"good": "ok", "cutgz": "failed", "cutnii": "failed", "nannii": "failed", "nanmha": "failed"}
    assert re.search(r"cut\.nii\.gz': truncated: the header declares 31680 bytes of voxel data", errors["cutgz"])
    assert re.search(r"cut\.nii': truncated: the header declares 31680 bytes of voxel data, the file holds \d+$",
                     errors["cutnii"])
    assert errors["nannii"].endswith("nan.nii': contains 3 NaN or infinite voxels (of 7920)")
    assert errors["nanmha"].endswith("nan.mha': contains 3 NaN or infinite voxels (of 7920)")

    images = zarr.open_group(str(store), mode="r")["images"]
    files = dict(images["good"].attrs)["files"]
    content = good.read_bytes()
    assert files == {"image": {"path": str(good.resolve()), "bytes": len(content),
                               "sha256": hashlib.sha256(content).hexdigest()}}
    assert file_digest(good) == (len(content), hashlib.sha256(content).hexdigest())
    failed = dict(images["cutnii"].attrs)
    assert failed["status"] == "failed" and failed["files"]["image"]["bytes"] == (tmp_path / "cut.nii").stat().st_size
