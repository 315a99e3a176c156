"""A small NIfTI-1 writer and reader for the worker-process mode (files exchanged with the
``sfr`` command-line tool), without nibabel (Slicer's Python does not ship it).

The NIfTI affine *is* Slicer's IJK-to-RAS matrix (both map voxel (i, j, k) to RAS mm), so
files are written with that matrix as the sform (code 1, "scanner") and voxels in i-fastest
order, which is exactly the memory order of a C-contiguous ``[k, j, i]`` numpy array.
Reading supports what the ``sfr`` tool and common tools write: sform, else qform, else pixdim;
gzip detected by its magic bytes; either byte order; scl_slope/scl_inter.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Tuple

import numpy as np

_CODES = {
    np.dtype(np.uint8): 2,
    np.dtype(np.int16): 4,
    np.dtype(np.int32): 8,
    np.dtype(np.float32): 16,
    np.dtype(np.float64): 64,
    np.dtype(np.int8): 256,
    np.dtype(np.uint16): 512,
    np.dtype(np.uint32): 768,
}
_DTYPES = {code: dt for dt, code in _CODES.items()}
_HEADER_SIZE = 348
_VOX_OFFSET = 352  # header + the 4-byte "no extensions" marker
_CHUNK = 8 * 1024 * 1024  # bytes written per call


def write(path, array: np.ndarray, ijk_to_ras) -> None:
    """Writes a ``[k, j, i]`` array with its IJK-to-RAS matrix. Types NIfTI-1 lacks are stored
    as float32."""
    a = np.asarray(array)
    if a.ndim != 3:
        raise ValueError(f"NIfTI writer: expected a 3D [k, j, i] array, got shape {a.shape}")
    dt = a.dtype.newbyteorder("=") if a.dtype.byteorder not in ("=", "|") else a.dtype
    if dt not in _CODES:
        dt = np.dtype(np.float32)
    a = np.ascontiguousarray(a, dtype=dt.newbyteorder("<"))
    m = np.asarray(ijk_to_ras, dtype=float)
    nz, ny, nx = a.shape
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    hdr = bytearray(_VOX_OFFSET)
    struct.pack_into("<i", hdr, 0, _HEADER_SIZE)
    struct.pack_into("<8h", hdr, 40, 3, nx, ny, nz, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, _CODES[dt], dt.itemsize * 8)
    struct.pack_into("<8f", hdr, 76, 1.0, *spacing, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", hdr, 108, float(_VOX_OFFSET))
    struct.pack_into("<ff", hdr, 112, 1.0, 0.0)  # scl_slope, scl_inter: identity
    hdr[123] = 2  # xyzt_units: mm
    struct.pack_into("<hh", hdr, 252, 0, 1)  # qform_code 0, sform_code 1
    struct.pack_into("<4f", hdr, 280, *m[0])
    struct.pack_into("<4f", hdr, 296, *m[1])
    struct.pack_into("<4f", hdr, 312, *m[2])
    hdr[344:348] = b"n+1\0"
    path = Path(path)
    # Streamed from the array's own memory in chunks: no copy of the volume, and Python's
    # GIL is released during each chunk's write or compression. (Writing "header + a.tobytes()"
    # in one piece held the GIL through two 150 MB copies: a GUI thread stalled 0.2 s while a
    # helper thread wrote a 512x512x300 volume.)
    flat = memoryview(a.reshape(-1)).cast("B")
    opener = (lambda p: gzip.open(p, "wb", compresslevel=1)) if path.name.lower().endswith(".gz") else (lambda p: open(p, "wb"))
    with opener(path) as f:
        f.write(bytes(hdr))
        for start in range(0, len(flat), _CHUNK):
            f.write(flat[start : start + _CHUNK])


def _read_bytes(path: Path):
    """The file's bytes, decompressed when gzipped. A gzip file is decompressed in chunks into
    one buffer sized from its trailer, so that Python's GIL is never held for long (a helper
    thread decompressing a 512x512x300 volume in one call stalled a GUI thread 0.2 s)."""
    # Unbuffered: FileIO.readall reads the whole file into one buffer without the GIL. (A
    # buffered reader that has read the magic bytes joins its buffer with the rest: a copy of
    # the whole file with the GIL held.)
    with open(path, "rb", buffering=0) as f:
        if f.read(2) != b"\x1f\x8b":
            f.seek(0)
            return f.readall()
        f.seek(-4, 2)
        (size,) = struct.unpack("<I", f.read(4))  # ISIZE: the size modulo 2**32
    buf = np.empty(size, dtype=np.uint8)
    view = memoryview(buf)
    n = 0
    with gzip.open(path, "rb") as f:
        while n < size:
            got = f.readinto(view[n : n + _CHUNK])
            if not got:
                break
            n += got
        rest = f.read()
    if n == size and not rest:
        return view
    # ISIZE did not tell the size (over 4 GB, or several gzip members): the plain way.
    with gzip.open(path, "rb") as f:
        return f.read()


def _quaternion_affine(h, e: str) -> np.ndarray:
    b, c, d = struct.unpack_from(e + "3f", h, 256)
    qx, qy, qz = struct.unpack_from(e + "3f", h, 268)
    pix = struct.unpack_from(e + "8f", h, 76)
    qfac = -1.0 if pix[0] < 0 else 1.0
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    r = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    s = np.array([abs(pix[1]) or 1.0, abs(pix[2]) or 1.0, qfac * (abs(pix[3]) or 1.0)])
    m = np.eye(4)
    m[:3, :3] = r * s[np.newaxis, :]
    m[:3, 3] = (qx, qy, qz)
    return m


def read(path) -> Tuple[np.ndarray, np.ndarray]:
    """Reads a 3D NIfTI-1 file -> (``[k, j, i]`` array, IJK-to-RAS 4x4 matrix)."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < _HEADER_SIZE:
        raise ValueError(f"{path}: not a NIfTI-1 file (only {len(raw)} bytes)")
    if struct.unpack_from("<i", raw, 0)[0] == _HEADER_SIZE:
        e = "<"
    elif struct.unpack_from(">i", raw, 0)[0] == _HEADER_SIZE:
        e = ">"
    else:
        raise ValueError(f"{path}: not a NIfTI-1 file (bad header size)")
    if raw[344:347] != b"n+1":
        raise ValueError(f"{path}: not a single-file NIfTI-1 (.nii) image")
    dim = struct.unpack_from(e + "8h", raw, 40)
    if not 1 <= dim[0] <= 7 or any(d != 1 for d in dim[4 : dim[0] + 1]):
        raise ValueError(f"{path}: only 3D volumes are supported (dim {dim[: dim[0] + 1]})")
    nx, ny, nz = (dim[i] if i <= dim[0] else 1 for i in (1, 2, 3))
    code = struct.unpack_from(e + "h", raw, 70)[0]
    if code not in _DTYPES:
        raise ValueError(f"{path}: NIfTI datatype {code} is not supported")
    dt = _DTYPES[code].newbyteorder(e)
    offset = int(struct.unpack_from(e + "f", raw, 108)[0])
    count = nx * ny * nz
    if len(raw) < offset + count * dt.itemsize:
        raise ValueError(f"{path}: truncated (header claims {count} voxels of {dt.name})")
    a = np.frombuffer(raw, dtype=dt, count=count, offset=offset).reshape(nz, ny, nx)
    a = a.astype(dt.newbyteorder("="))
    slope, inter = struct.unpack_from(e + "ff", raw, 112)
    if slope not in (0.0, 1.0) or inter != 0.0:
        if np.isfinite(slope) and slope != 0.0:
            a = a.astype(np.float64 if a.dtype == np.float64 else np.float32) * slope + inter
    qform_code, sform_code = struct.unpack_from(e + "hh", raw, 252)
    if sform_code > 0:
        m = np.eye(4)
        for r in range(3):
            m[r] = struct.unpack_from(e + "4f", raw, 280 + 16 * r)
    elif qform_code > 0:
        m = _quaternion_affine(raw, e)
    else:
        pix = struct.unpack_from(e + "8f", raw, 76)
        m = np.diag([abs(pix[1]) or 1.0, abs(pix[2]) or 1.0, abs(pix[3]) or 1.0, 1.0])
    return a, m
