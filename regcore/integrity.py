"""Integrity checks of image files that SimpleITK does not make: truncation and non-finite voxels.

SimpleITK (ITK 5.4) reads a NIfTI file whose voxel data is cut short without an error, the missing
voxels read as 0. Its NIfTI reader (niftilib's ``nifti_read_buffer``) also replaces every NaN or
infinite float voxel by 0 before ITK sees the data, so non-finite NIfTI voxels cannot be found in
what SimpleITK returns. The functions here therefore look at the files themselves:

* :func:`check_file`, before SimpleITK reads a file: parses the header of NIfTI-1/NIfTI-2 (``.nii``,
  ``.nii.gz``, ``.hdr``/``.img``), MetaImage (``.mha``, ``.mhd``) and NRRD (``.nrrd``, ``.nhdr``;
  raw and gzip encodings), compares the voxel bytes the header declares with the bytes the file
  holds (gzip/zlib streams are decompressed in chunks, so a cut or corrupt stream is found), and
  counts NaN/inf among the stored voxels of float NIfTI files. A header it does not recognise, a
  layout it does not handle (ASCII data, file lists, skips) and every other format are left to
  SimpleITK.
* :func:`check_finite`, after SimpleITK read a file: counts NaN/inf in float voxel data.
* :func:`file_digest`: the size and sha256 of a file, streamed.

Every problem raises :class:`~regcore.errors.InputError` with a message naming the file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from .errors import InputError

__all__ = [
    "check_file",
    "check_finite",
    "count_nonfinite",
    "file_digest",
    "NiftiHeader",
    "parse_nifti_header",
    "MetaHeader",
    "parse_meta_header",
    "NrrdHeader",
    "parse_nrrd_header",
]

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read (and at most decompressed) per step
_GZIP_MAGIC = b"\x1f\x8b"

# NIfTI datatype code -> (bytes per voxel, numpy kind of one component or None when not float)
_NIFTI_TYPES: dict[int, tuple[int, str | None]] = {
    2: (1, None), 4: (2, None), 8: (4, None), 16: (4, "f4"), 32: (8, "f4"), 64: (8, "f8"),
    128: (3, None), 256: (1, None), 512: (2, None), 768: (4, None), 1024: (8, None), 1280: (8, None),
    1536: (16, None), 1792: (16, "f8"), 2048: (32, None), 2304: (4, None),
}
_META_TYPES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_ASCII_CHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
    "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int",
                     "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64",
                     "uint64_t", "double"), 8),
}


# ------------------------------------------------------------------------------------------ public
def check_file(path: str | Path) -> None:
    """Check that the voxel data of ``path`` is as long as its header declares (and, for float
    NIfTI, finite); the format is chosen by the file name.

    Raises:
        InputError: the file (or its data file) is truncated, its compressed stream is cut or
            corrupt, its data file is missing, or a float NIfTI file stores NaN or infinite voxels.
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz")):
        _check_nifti(p)
    elif name.endswith((".mha", ".mhd")):
        _check_meta(p)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(p)


def count_nonfinite(array: np.ndarray) -> int:
    """Number of NaN or infinite values in ``array`` (0 for integer data); one pass over the data."""
    if array.dtype.kind not in "fc":
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_finite(array: np.ndarray, path: str | Path, what: str = "image") -> None:
    """Raise :class:`InputError` naming ``path`` when the float ``array`` holds NaN or infinity."""
    bad = count_nonfinite(array)
    if bad:
        raise InputError(f"{what} {str(path)!r}: contains {bad} NaN or infinite voxels (of {array.size})")


def file_digest(path: str | Path, chunk_size: int = CHUNK) -> tuple[int, str]:
    """``(size in bytes, sha256 hex digest)`` of the file's content, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


# ------------------------------------------------------------------------------------------ streams
def _file_chunks(fh: BinaryIO, chunk_size: int = CHUNK) -> Iterator[bytes]:
    while block := fh.read(chunk_size):
        yield block


def inflate(chunks: Iterable[bytes], wbits: int = 31, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """Decompress a gzip (``wbits=31``, several members allowed) or zlib (``wbits=15``; ``47``
    detects either) stream given in chunks, yielding at most ``chunk_size`` bytes at a time.

    Data after the last gzip member that is not another member is ignored, as zlib's ``gzread``
    (which ITK uses) does.

    Raises:
        EOFError: the stream ends before its end marker (a truncated file).
        zlib.error: the stream is corrupt (bad header, bad data or a wrong checksum).
    """
    it = iter(chunks)
    d = zlib.decompressobj(wbits)
    data = b""
    while True:
        if not data:
            data = next(it, b"")
            if not data:
                break
        out = d.decompress(data, chunk_size)
        if out:
            yield out
        if d.eof:
            rest = d.unused_data
            while len(rest) < 2 and (more := next(it, b"")):
                rest += more
            if wbits & 16 and rest[:2] == _GZIP_MAGIC:  # another gzip member
                d, data = zlib.decompressobj(wbits), rest
                continue
            return
        data = d.unconsumed_tail
    if not d.eof:
        raise EOFError("the compressed stream ends before its end marker")


def _open_stream(fh: BinaryIO) -> tuple[_Guarded, bool]:
    """Chunks of the file's content from its current position, decompressed when it starts with
    the gzip magic bytes (as zlib's ``gzopen`` does whatever the file name)."""
    start = fh.tell()
    gz = fh.read(2) == _GZIP_MAGIC
    fh.seek(start)
    return _Guarded(inflate(_file_chunks(fh)) if gz else _file_chunks(fh)), gz


def _take(it: Iterator[bytes], n: int) -> tuple[bytes, Iterator[bytes]]:
    """The first ``n`` bytes of ``it`` (fewer at its end) and an iterator over the rest."""
    buf = bytearray()
    for chunk in it:
        buf += chunk
        if len(buf) >= n:
            break
    head, rest = bytes(buf[:n]), bytes(buf[n:])

    def remainder() -> Iterator[bytes]:
        if rest:
            yield rest
        yield from it

    return head, remainder()


class _Guarded:
    """Iterate a (decompressing) stream; a truncated or corrupt stream ends the iteration and is
    recorded in ``error`` instead of raising, so the bytes read before it still count."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.error = ""

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.chunks
        except EOFError as exc:
            self.error = str(exc)
        except zlib.error as exc:
            self.error = f"corrupt compressed data ({exc})"


@dataclass
class _Scan:
    nbytes: int = 0  # bytes the stream held after the skipped prefix
    nonfinite: int = 0  # NaN/inf among the first ``limit`` bytes read as ``dtype``
    error: str = ""  # "" or why the stream stopped early (see :class:`_Guarded`)


def _scan(chunks: Iterable[bytes], limit: int, dtype: np.dtype | None) -> _Scan:
    """Count the bytes of ``chunks`` and the non-finite ``dtype`` values in their first ``limit`` bytes."""
    scan = _Scan()
    carry = b""
    for chunk in chunks:
        if dtype is not None and scan.nbytes < limit:
            part = carry + chunk[: max(0, limit - scan.nbytes)]
            usable = len(part) - len(part) % dtype.itemsize
            scan.nonfinite += count_nonfinite(np.frombuffer(part, dtype=dtype, count=usable // dtype.itemsize))
            carry = part[usable:]
        scan.nbytes += len(chunk)
    return scan


def _report(path: Path, what: str, expected: int, scan: _Scan, data_file: Path | None, compressed: bool,
            nvalues: int = 0) -> None:
    """Raise the :class:`InputError` that ``scan`` calls for (nothing when the data is whole and finite)."""
    where = "the file" if data_file is None else f"the data file {str(data_file)!r}"
    if scan.nbytes < expected:
        held = f"{where} holds {scan.nbytes}" + (" once decompressed" if compressed else "")
        why = f" ({scan.error})" if scan.error else ""
        raise InputError(f"{what} {str(path)!r}: truncated: the header declares {expected} bytes of voxel data, "
                         f"{held}{why}")
    if scan.error:
        kind = "" if scan.error.startswith("corrupt") else "truncated: "
        raise InputError(f"{what} {str(path)!r}: {kind}{scan.error}, in {where} after all {expected} bytes of "
                         "voxel data")
    if scan.nonfinite:
        raise InputError(f"{what} {str(path)!r}: contains {scan.nonfinite} NaN or infinite voxels (of {nvalues})")


def _check_plain_size(path: Path, what: str, expected: int, data_file: Path, offset: int) -> None:
    held = max(0, os.path.getsize(data_file) - offset)
    if held < expected:
        _report(path, what, expected, _Scan(nbytes=held), None if data_file == path else data_file, False)


def _data_file(path: Path, name: str, what: str) -> Path:
    data = (path.parent / name) if not os.path.isabs(name) else Path(name)
    if not data.is_file():
        raise InputError(f"{what} {str(path)!r}: the data file {str(data)!r} named by its header does not exist")
    return data


# ------------------------------------------------------------------------------------------ NIfTI
@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1 (or Analyze 7.5) / NIfTI-2 header that size the voxel data."""

    version: int  # 1 (NIfTI-1 or Analyze) or 2
    byteorder: str  # "<" or ">"
    dims: tuple[int, ...]  # dim[1..dim[0]]
    datatype: int
    bitpix: int
    vox_offset: int
    scl_slope: float
    scl_inter: float
    magic: bytes  # b"n+1", b"ni1", b"n+2", b"ni2" or b"" (Analyze)

    @property
    def header_size(self) -> int:
        return 348 if self.version == 1 else 540

    @property
    def single_file(self) -> bool:
        """Header and voxels in one file (``.nii``)."""
        return self.magic in (b"n+1", b"n+2")

    @property
    def nvox(self) -> int:
        return math.prod(self.dims)

    @property
    def data_bytes(self) -> int:
        """Bytes of voxel data the header declares (``nvox * bitpix / 8``, sized by the datatype)."""
        size = _NIFTI_TYPES.get(self.datatype, (0, None))[0]
        return self.nvox * size if size else (self.nvox * self.bitpix + 7) // 8

    @property
    def float_dtype(self) -> np.dtype | None:
        """numpy dtype of one stored float component (``None`` for integer or exotic types)."""
        kind = _NIFTI_TYPES.get(self.datatype, (0, None))[1]
        return np.dtype(self.byteorder + kind) if kind else None


def parse_nifti_header(raw: bytes) -> NiftiHeader | None:
    """Parse the first 348 (NIfTI-1, Analyze) or 540 (NIfTI-2) bytes of a header, either endianness.

    Returns ``None`` when ``raw`` does not start like a NIfTI/Analyze header or its sizing fields
    are not usable (SimpleITK then decides). A header cut short raises :class:`ValueError`.
    """
    if len(raw) < 4:
        return None
    for bo in "<>":
        (sizeof_hdr,) = struct.unpack(bo + "i", raw[:4])
        if sizeof_hdr in (348, 540):
            break
    else:
        return None
    if len(raw) < sizeof_hdr:
        raise ValueError(f"{len(raw)} bytes, less than its {sizeof_hdr}-byte header")
    if sizeof_hdr == 348:
        dim = struct.unpack(bo + "8h", raw[40:56])
        datatype, bitpix = struct.unpack(bo + "hh", raw[70:74])
        vox_offset, slope, inter = struct.unpack(bo + "fff", raw[108:120])
        magic = raw[344:347]
        if magic not in (b"n+1", b"ni1"):
            magic = b""
        version = 1
    else:
        magic = raw[4:7]
        if magic not in (b"n+2", b"ni2"):
            return None
        datatype, bitpix = struct.unpack(bo + "hh", raw[12:16])
        dim = struct.unpack(bo + "8q", raw[16:80])
        vox_offset, slope, inter = struct.unpack(bo + "qdd", raw[168:192])
        version = 2
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d <= 0 for d in dim[1: ndim + 1]) or bitpix <= 0:
        return None
    if not math.isfinite(vox_offset) or vox_offset < 0:
        return None
    return NiftiHeader(version, bo, tuple(int(d) for d in dim[1: ndim + 1]), int(datatype), int(bitpix),
                       int(vox_offset), float(slope), float(inter), bytes(magic))


def _nifti_pair(path: Path) -> tuple[Path, list[Path]]:
    """The header file and the candidate data files of an Analyze/NIfTI pair named by ``path``."""
    name = path.name
    low = name.lower()
    for ext in (".hdr.gz", ".img.gz", ".hdr", ".img"):
        if low.endswith(ext):
            stem = name[: -len(ext)]
            break
    else:
        return path, []
    upper = name[len(stem):len(stem) + 2].isupper()
    hdr_ext, img_ext = (".HDR", ".IMG") if upper else (".hdr", ".img")
    header = path if low.endswith((".hdr", ".hdr.gz")) else next(
        (c for c in (path.with_name(stem + hdr_ext), path.with_name(stem + hdr_ext + ".gz")) if c.is_file()),
        path.with_name(stem + hdr_ext))
    data = [path.with_name(stem + img_ext), path.with_name(stem + img_ext + ".gz")]
    return header, data


def _check_nifti(path: Path, what: str = "image") -> None:
    header_path, data_candidates = _nifti_pair(path)
    if not header_path.is_file():
        return  # SimpleITK reports the missing header
    with open(header_path, "rb") as fh:
        stream, compressed = _open_stream(fh)
        raw, rest = _take(iter(stream), 540)
        try:
            hdr = parse_nifti_header(raw)
        except ValueError as exc:
            why = f" ({stream.error})" if stream.error else ""
            raise InputError(f"{what} {str(path)!r}: truncated: the file holds {exc}{why}") from exc
        if hdr is None:
            if stream.error:  # not even a header came out of a broken stream
                if stream.error.startswith("corrupt"):
                    raise InputError(f"{what} {str(path)!r}: {stream.error}")
                raise InputError(f"{what} {str(path)!r}: truncated: {stream.error}, after {len(raw)} decompressed bytes")
            log.debug("%s: not a NIfTI/Analyze header, left to SimpleITK", path)
            return
        if hdr.single_file:
            offset = max(hdr.vox_offset, hdr.header_size)
            if not compressed and hdr.float_dtype is None:
                _check_plain_size(path, what, hdr.data_bytes, path, offset)
                return
            scan = _scan_from(raw, rest, offset, hdr.data_bytes, hdr.float_dtype)
            scan.error = stream.error
            _report(path, what, hdr.data_bytes, scan, None, compressed, hdr.nvox)
            return
    if not data_candidates:
        return  # an Analyze-like header in a .nii: unusual, left to SimpleITK
    data_path = next((c for c in data_candidates if c.is_file()), None)
    if data_path is None:
        raise InputError(f"{what} {str(path)!r}: the data file {str(data_candidates[0])!r} of this header "
                         "does not exist")
    with open(data_path, "rb") as fh:
        stream, compressed = _open_stream(fh)
        if not compressed and hdr.float_dtype is None:
            _check_plain_size(path, what, hdr.data_bytes, data_path, hdr.vox_offset)
            return
        scan = _scan_from(b"", iter(stream), hdr.vox_offset, hdr.data_bytes, hdr.float_dtype)
        scan.error = stream.error
    _report(path, what, hdr.data_bytes, scan, data_path, compressed, hdr.nvox)


def _scan_from(head: bytes, rest: Iterable[bytes], offset: int, limit: int, dtype: np.dtype | None) -> _Scan:
    """:func:`_scan` of the stream ``head + rest`` from byte ``offset`` on."""

    def chunks() -> Iterator[bytes]:
        skip = offset
        if head:
            if len(head) > skip:
                yield head[skip:]
            skip = max(0, skip - len(head))
        for chunk in rest:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:] if skip else chunk
            skip = 0

    return _scan(chunks(), limit, dtype)


# ------------------------------------------------------------------------------------------ MetaImage
@dataclass(frozen=True)
class MetaHeader:
    """The fields of a MetaImage header that size the voxel data."""

    fields: dict[str, str]  # every "Key = Value" line, keys as written
    data_offset: int  # where the header ends in the header file (start of LOCAL data)

    def get(self, key: str, default: str = "") -> str:
        low = key.lower()
        return next((v for k, v in self.fields.items() if k.lower() == low), default)

    @property
    def data_bytes(self) -> int | None:
        """Uncompressed voxel bytes, or ``None`` when the header does not say (unknown type)."""
        etype = self.get("ElementType").upper().removesuffix("_ARRAY")
        size = _META_TYPES.get(etype)
        try:
            dims = [int(v) for v in self.get("DimSize").split()]
            channels = int(self.get("ElementNumberOfChannels", "1") or 1)
        except ValueError:
            return None
        if size is None or not dims or any(d <= 0 for d in dims) or channels <= 0:
            return None
        return math.prod(dims) * channels * size

    @property
    def compressed(self) -> bool:
        return self.get("CompressedData", "False").strip().lower() in ("true", "1")


def parse_meta_header(fh: BinaryIO, max_lines: int = 500) -> MetaHeader | None:
    """Read a MetaImage header from ``fh`` up to and including its ``ElementDataFile`` line.

    Returns ``None`` when no ``ElementDataFile`` line comes first (not a MetaImage header).
    """
    fields: dict[str, str] = {}
    for _ in range(max_lines):
        line = fh.readline(1 << 16)
        if not line:
            return None
        text = line.decode("latin-1").strip()
        if not text:
            continue
        key, sep, value = text.partition("=")
        if not sep:
            return None
        fields[key.strip()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            return MetaHeader(fields, fh.tell())
    return None


def _check_meta(path: Path, what: str = "image") -> None:
    with open(path, "rb") as fh:
        hdr = parse_meta_header(fh)
    if hdr is None:
        return
    expected = hdr.data_bytes
    source = hdr.get("ElementDataFile")
    if expected is None or hdr.get("BinaryData", "True").strip().lower() in ("false", "0"):
        return  # unknown type or ASCII data: left to SimpleITK
    if source.upper() == "LOCAL":
        data_path, offset = path, hdr.data_offset
    else:
        if source.upper().startswith("LIST") or "%" in source or " " in source:
            return  # a list of slice files: left to SimpleITK
        data_path = _data_file(path, source, what)
        try:
            offset = int(hdr.get("HeaderSize", "0") or 0)
        except ValueError:
            return
        if offset < 0:  # -1: the data is the last bytes of the file, its start is not declared
            return
    data_file = None if data_path == path else data_path
    if not hdr.compressed:
        _check_plain_size(path, what, expected, data_path, offset)
        return
    with open(data_path, "rb") as fh:
        fh.seek(offset)
        stream = _Guarded(inflate(_file_chunks(fh), wbits=47))
        scan = _scan(stream, expected, None)
        scan.error = stream.error
    if not scan.error and scan.nbytes < expected:
        stored = os.path.getsize(data_path) - offset
        declared = hdr.get("CompressedDataSize")
        if declared.isdigit() and stored < int(declared):
            scan.error = f"the header declares {declared} compressed bytes, the file holds {stored}"
    _report(path, what, expected, scan, data_file, True)


# ------------------------------------------------------------------------------------------ NRRD
@dataclass(frozen=True)
class NrrdHeader:
    """The fields of a NRRD header (lower-case keys) and where the header ends."""

    fields: dict[str, str]
    data_offset: int

    @property
    def data_bytes(self) -> int | None:
        size = _NRRD_TYPES.get(self.fields.get("type", "").strip().lower())
        try:
            sizes = [int(v) for v in self.fields.get("sizes", "").split()]
        except ValueError:
            return None
        if size is None or not sizes or any(s <= 0 for s in sizes):
            return None
        return math.prod(sizes) * size


def parse_nrrd_header(fh: BinaryIO, max_lines: int = 1000) -> NrrdHeader | None:
    """Read a NRRD header from ``fh`` up to its blank line (or end of a detached header).

    Returns ``None`` when ``fh`` does not start with the ``NRRD000x`` magic.
    """
    if not re.fullmatch(rb"NRRD000\d\r?\n", fh.readline(64)):
        return None
    fields: dict[str, str] = {}
    for _ in range(max_lines):
        line = fh.readline(1 << 16)
        if not line or not line.strip():
            return NrrdHeader(fields, fh.tell())
        text = line.decode("latin-1").rstrip("\r\n")
        if text.startswith("#"):
            continue
        key, sep, value = text.partition(":")
        if sep and not value.startswith("="):  # "key:=value" lines are key/value pairs, not fields
            fields[key.strip().lower()] = value.strip()
    return None


def _check_nrrd(path: Path, what: str = "image") -> None:
    with open(path, "rb") as fh:
        hdr = parse_nrrd_header(fh)
    if hdr is None:
        return
    expected = hdr.data_bytes
    encoding = hdr.fields.get("encoding", "").strip().lower()
    if expected is None or encoding not in ("raw", "gzip", "gz"):
        return  # block type, ASCII/hex/bzip2 encodings: left to SimpleITK
    if any(hdr.fields.get(k, "0").strip() not in ("", "0") for k in ("line skip", "lineskip", "byte skip", "byteskip")):
        return
    source = hdr.fields.get("data file", hdr.fields.get("datafile", ""))
    if source:
        if source.upper().startswith("LIST") or " " in source.strip() or "%" in source:
            return
        data_path, offset = _data_file(path, source.strip(), what), 0
    else:
        data_path, offset = path, hdr.data_offset
    data_file = None if data_path == path else data_path
    if encoding == "raw":
        _check_plain_size(path, what, expected, data_path, offset)
        return
    with open(data_path, "rb") as fh:
        fh.seek(offset)
        stream = _Guarded(inflate(_file_chunks(fh), wbits=31))
        scan = _scan(stream, expected, None)
        scan.error = stream.error
    _report(path, what, expected, scan, data_file, True)
