"""ctypes bindings of libsfr's C ABI (include/sfr.h) and the search for the library file.

Every function of the header is declared here with its argtypes/restype; a failing call raises
:class:`SfrError` carrying the status name and ``sfr_last_error_message``. The message is
thread-local in the library, so it is read right after the failing call on the same thread.

Search order (the first file that exists is loaded):
  1. the explicit path given by the caller (the module's setting),
  2. the environment variable ``SFR_LIBRARY``,
  3. next to the module: ``SFRSegmentation/lib/``, ``SFRSegmentation/`` and, for a source
     checkout, the crate's ``target/release/``.
A path given by 1. or 2. that points nowhere is an error, as is a file that exists but does
not load (typically: libtorch not found): neither is skipped in favour of another copy.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char,
    c_char_p,
    c_double,
    c_float,
    c_int,
    c_size_t,
    c_uint64,
    c_uint8,
    c_void_p,
)
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

# Library versions this module speaks to: same major; before 1.0 also the same minor (the
# ABI may change between 0.x minors).
SUPPORTED_VERSION = (0, 1)

ENV_VAR = "SFR_LIBRARY"

# ---------------------------------------------------------------------------------------------
# Enums and structs (sfr.h)

STATUS_NAMES = {
    0: "SFR_OK",
    1: "SFR_ERR_NULL_POINTER",
    2: "SFR_ERR_INVALID_ARGUMENT",
    3: "SFR_ERR_BUFFER_TOO_SMALL",
    4: "SFR_ERR_IO",
    5: "SFR_ERR_FORMAT",
    6: "SFR_ERR_CANCELLED",
    7: "SFR_ERR_TORCH",
    8: "SFR_ERR_BAD_HANDLE",
    9: "SFR_ERR_STATE",
    10: "SFR_ERR_PANIC",
}
SFR_OK = 0
SFR_ERR_BUFFER_TOO_SMALL = 3
SFR_ERR_CANCELLED = 6

# sfr_dtype
DTYPE_U8, DTYPE_I8, DTYPE_U16, DTYPE_I16, DTYPE_U32, DTYPE_I32, DTYPE_F32, DTYPE_F64 = range(8)
NUMPY_TO_SFR = {
    np.dtype(np.uint8): DTYPE_U8,
    np.dtype(np.int8): DTYPE_I8,
    np.dtype(np.uint16): DTYPE_U16,
    np.dtype(np.int16): DTYPE_I16,
    np.dtype(np.uint32): DTYPE_U32,
    np.dtype(np.int32): DTYPE_I32,
    np.dtype(np.float32): DTYPE_F32,
    np.dtype(np.float64): DTYPE_F64,
}


class SfrVolumeView(Structure):
    _fields_ = [
        ("data", c_void_p),
        ("data_len", c_size_t),
        ("dtype", c_int),
        ("dims", c_size_t * 3),
        ("spacing", c_double * 3),
        ("origin", c_double * 3),
        ("direction", c_double * 9),
    ]


class SfrProgress(Structure):
    _fields_ = [
        ("stage", c_char * 32),
        ("step", c_uint64),
        ("total", c_uint64),
        ("loss", c_double),
        ("eta_seconds", c_double),
        ("message", c_char * 256),
        ("finished", c_int),
    ]

    def to_dict(self) -> dict:
        loss = float(self.loss)
        eta = float(self.eta_seconds)
        return {
            "stage": self.stage.decode("utf-8", "replace"),
            "step": int(self.step),
            "total": int(self.total),
            "loss": None if loss != loss else loss,  # NaN = no loss yet
            "eta_seconds": None if eta < 0 else eta,
            "message": self.message.decode("utf-8", "replace"),
            "finished": bool(self.finished),
        }


PROGRESS_CALLBACK = CFUNCTYPE(None, POINTER(SfrProgress), c_void_p)

# Opaque handles: plain void pointers.
Handle = c_void_p

# name -> (restype, argtypes); c_int restype = sfr_status.
_SIGNATURES = {
    "sfr_version": (c_char_p, []),
    "sfr_last_error_message": (c_size_t, [c_char_p, c_size_t]),
    "sfr_stitch_layout": (c_int, [POINTER(c_size_t), c_size_t, POINTER(c_size_t), POINTER(c_size_t)]),
    "sfr_stitch_image": (c_int, [POINTER(SfrVolumeView), c_size_t, POINTER(c_float), c_size_t]),
    "sfr_stitch_labels": (c_int, [POINTER(SfrVolumeView), c_size_t, POINTER(c_uint8), c_size_t]),
    "sfr_unstitch_labels": (c_int, [POINTER(c_uint8), c_size_t, c_size_t, POINTER(c_size_t), POINTER(c_uint8), c_size_t]),
    "sfr_dataset_new": (c_int, [c_char_p, POINTER(Handle)]),
    "sfr_dataset_add_labeled": (c_int, [Handle, c_char_p, POINTER(SfrVolumeView), POINTER(SfrVolumeView)]),
    "sfr_dataset_add_unlabeled": (c_int, [Handle, c_char_p, POINTER(SfrVolumeView)]),
    "sfr_dataset_counts": (c_int, [Handle, POINTER(c_size_t), POINTER(c_size_t)]),
    "sfr_dataset_free": (None, [Handle]),
    "sfr_train_start": (c_int, [Handle, c_char_p, POINTER(Handle)]),
    "sfr_train_start_with_callback": (c_int, [Handle, c_char_p, PROGRESS_CALLBACK, c_void_p, POINTER(Handle)]),
    "sfr_job_poll": (c_int, [Handle, POINTER(SfrProgress)]),
    "sfr_job_cancel": (c_int, [Handle]),
    "sfr_job_wait": (c_int, [Handle, POINTER(Handle)]),
    "sfr_job_free": (None, [Handle]),
    "sfr_model_load": (c_int, [c_char_p, c_char_p, POINTER(Handle)]),
    "sfr_model_save": (c_int, [Handle, c_char_p]),
    "sfr_model_metadata_json": (c_int, [Handle, c_char_p, c_size_t, POINTER(c_size_t)]),
    "sfr_model_num_classes": (c_int, [Handle, POINTER(c_size_t)]),
    "sfr_model_free": (None, [Handle]),
    "sfr_segment": (c_int, [Handle, POINTER(SfrVolumeView), c_int, c_void_p, c_size_t, POINTER(c_float), c_size_t]),
    "sfr_segment_start": (c_int, [Handle, POINTER(SfrVolumeView), POINTER(Handle)]),
    "sfr_job_wait_segmentation": (c_int, [Handle, c_int, c_void_p, c_size_t, POINTER(c_float), c_size_t]),
}


# ---------------------------------------------------------------------------------------------
# Errors


class SfrError(RuntimeError):
    """A libsfr call failed. ``status`` is the status name (e.g. ``SFR_ERR_INVALID_ARGUMENT``),
    ``detail`` the library's message."""

    def __init__(self, status: str, detail: str, function: str = ""):
        self.status = status
        self.detail = detail
        self.function = function
        where = f"{function}: " if function else ""
        super().__init__(f"{where}{status}: {detail}" if detail else f"{where}{status}")


class Cancelled(SfrError):
    """The job was cancelled (SFR_ERR_CANCELLED, or a cancelled worker process)."""

    def __init__(self, detail: str = "the job was cancelled", function: str = ""):
        super().__init__("SFR_ERR_CANCELLED", detail, function)


class LibraryLoadError(RuntimeError):
    """libsfr was not found, did not load, or is of an unsupported version."""


# ---------------------------------------------------------------------------------------------
# Finding the library


def library_file_name() -> str:
    if sys.platform.startswith("win"):
        return "sfr.dll"
    if sys.platform == "darwin":
        return "libsfr.dylib"
    return "libsfr.so"


def module_dir() -> Path:
    """The scripted module's folder (``.../SFRSegmentation``)."""
    return Path(__file__).resolve().parent.parent


def installed_engine() -> Optional[dict]:
    """{"cli": Path, "library": Path} of the ``sfr-segmentation`` wheel installed in this Python
    (see install.py), or None where it is not installed (or a different package named ``sfr``
    is). Imports only the small ``sfr`` package; loads no library."""
    import importlib
    import importlib.util

    importlib.invalidate_caches()  # a package pip installed after this Python started
    if importlib.util.find_spec("sfr") is None:
        return None
    try:
        sfr = importlib.import_module("sfr")
        return {"cli": Path(sfr.executable()), "library": Path(sfr.library())}
    except (AttributeError, OSError, ImportError):
        return None


def candidate_paths(explicit: Optional[str] = None) -> List[Tuple[str, Path]]:
    """(where it came from, path) in search order. A folder stands for the library file in it."""
    name = library_file_name()
    out: List[Tuple[str, Path]] = []

    def add(origin: str, p) -> None:
        path = Path(p).expanduser()
        if path.is_dir():
            path = path / name
        out.append((origin, path))

    if explicit:
        add("setting", explicit)
    env = os.environ.get(ENV_VAR)
    if env:
        add(f"${ENV_VAR}", env)
    here = module_dir()
    add("next to the module", here / "lib" / name)
    add("next to the module", here / name)
    engine = installed_engine()
    if engine is not None:
        add("installed sfr-segmentation package", engine["library"])
    # A source checkout: slicer_module/SFRSegmentation/../../target/release/
    add("source checkout", here.parent.parent / "target" / "release" / name)
    return out


def _format_tried(tried: List[Tuple[str, Path, str]]) -> str:
    return "\n".join(f"  - {p} ({origin}): {why}" for origin, p, why in tried)


def parse_version(text: str) -> Tuple[int, int, int]:
    parts = text.strip().split("-")[0].split(".")
    try:
        major, minor, patch = (int(x) for x in (parts + ["0", "0"])[:3])
    except ValueError:
        raise LibraryLoadError(f"libsfr reported an unreadable version string {text!r}")
    return major, minor, patch


def version_is_compatible(version: Tuple[int, int, int]) -> bool:
    major, minor, _ = version
    want_major, want_minor = SUPPORTED_VERSION
    if major != want_major:
        return False
    return major > 0 or minor == want_minor


class Library:
    """A loaded libsfr: ``lib`` is the ctypes handle with every function declared."""

    def __init__(self, path: Path, cdll: ctypes.CDLL):
        self.path = Path(path)
        self.lib = cdll
        self.version = cdll.sfr_version().decode("utf-8", "replace")
        self.version_tuple = parse_version(self.version)

    # -- errors ---------------------------------------------------------------------------
    def last_error(self) -> str:
        needed = self.lib.sfr_last_error_message(None, 0)
        if needed <= 1:
            return ""
        buf = ctypes.create_string_buffer(int(needed))
        self.lib.sfr_last_error_message(buf, needed)
        return buf.value.decode("utf-8", "replace")

    def check(self, status: int, function: str) -> None:
        """Raises for a non-OK status (call right after the failing function, same thread)."""
        if status == SFR_OK:
            return
        detail = self.last_error()
        if status == SFR_ERR_CANCELLED:
            raise Cancelled(detail or "the job was cancelled", function)
        raise SfrError(STATUS_NAMES.get(status, f"SFR_STATUS_{status}"), detail, function)

    def call(self, function: str, *args) -> None:
        self.check(getattr(self.lib, function)(*args), function)

    # -- stitching helpers (the paper's first module, on caller buffers) --------------------
    def stitch_layout(self, dims_ijk, canvas: int) -> Tuple[int, int]:
        dims = (c_size_t * 3)(*dims_ijk)
        n_row, n_col = c_size_t(), c_size_t()
        self.call("sfr_stitch_layout", dims, canvas, ctypes.byref(n_row), ctypes.byref(n_col))
        return n_row.value, n_col.value

    def stitch_image(self, array: np.ndarray, ijk_to_ras, canvas: int) -> np.ndarray:
        view, keep = volume_view(array, ijk_to_ras)
        out = np.zeros((canvas, canvas), dtype=np.float32)
        self.call("sfr_stitch_image", ctypes.byref(view), canvas, out.ctypes.data_as(POINTER(c_float)), out.size)
        del keep
        return out

    def stitch_labels(self, labels: np.ndarray, ijk_to_ras, canvas: int) -> np.ndarray:
        view, keep = volume_view(np.asarray(labels, dtype=np.uint8), ijk_to_ras)
        out = np.zeros((canvas, canvas), dtype=np.uint8)
        self.call("sfr_stitch_labels", ctypes.byref(view), canvas, out.ctypes.data_as(POINTER(c_uint8)), out.size)
        del keep
        return out

    def unstitch_labels(self, canvas_labels: np.ndarray, shape_kji) -> np.ndarray:
        c = np.ascontiguousarray(canvas_labels, dtype=np.uint8)
        if c.ndim != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(f"a canvas must be square, got shape {c.shape}")
        k, j, i = (int(x) for x in shape_kji)
        out = np.zeros((k, j, i), dtype=np.uint8)
        dims = (c_size_t * 3)(i, j, k)
        self.call(
            "sfr_unstitch_labels",
            c.ctypes.data_as(POINTER(c_uint8)),
            c.size,
            c.shape[0],
            dims,
            out.ctypes.data_as(POINTER(c_uint8)),
            out.size,
        )
        return out


_loaded = {}
_load_lock = threading.Lock()


def find_library_path(explicit: Optional[str] = None) -> Path:
    """The library file that ``load_library`` would load, found by file checks only.

    A path that was given (the setting, or ``$SFR_LIBRARY``) and points nowhere is an error: a
    silent fallback to another copy would run a library the user did not choose."""
    tried: List[Tuple[str, Path, str]] = []
    for origin, path in candidate_paths(explicit):
        if path.is_file():
            return path
        tried.append((origin, path, "not found" if not path.exists() else "not a file"))
        if origin in ("setting", f"${ENV_VAR}"):
            where = "in the module's Setup section" if origin == "setting" else f"in the environment variable {ENV_VAR}"
            raise LibraryLoadError(
                f"the library path set {where} points nowhere: {path} does not exist. Correct or clear "
                "it (no other copy of libsfr is used in its place).\nTried:\n" + _format_tried(tried)
            )
    raise LibraryLoadError(
        f"libsfr ({library_file_name()}) was not found. Set its path in the module's settings, set the "
        f"environment variable {ENV_VAR}, or copy it into the module's 'lib' folder.\nTried:\n" + _format_tried(tried)
    )


def load_library(explicit: Optional[str] = None) -> Library:
    """Finds (see ``find_library_path``) and loads libsfr; checks its version and that every
    function of the contract is present. Thread-safe."""
    path = find_library_path(explicit)
    origin = "given"
    key = str(path.resolve())
    with _load_lock:
        if key in _loaded:
            return _loaded[key]
        tried: List[Tuple[str, Path, str]] = []
        try:
            cdll = ctypes.CDLL(str(path))
        except OSError as e:
            tried.append((origin, path, f"exists but could not be loaded: {e}"))
            raise LibraryLoadError(
                "libsfr was found but could not be loaded. A missing libtorch is the usual cause: the "
                "library finds libtorch through the path recorded when it was built (the cached "
                "PyTorch virtual environment); rebuild it, or put libtorch's lib folder on the "
                "library search path.\nTried:\n" + _format_tried(tried)
            ) from e
        missing = [n for n in _SIGNATURES if not hasattr(cdll, n)]
        if missing:
            tried.append((origin, path, f"lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"))
            raise LibraryLoadError(
                "this file is not a libsfr with the C ABI this module needs (too old, or another library).\n"
                "Tried:\n" + _format_tried(tried)
            )
        for name, (restype, argtypes) in _SIGNATURES.items():
            f = getattr(cdll, name)
            f.restype = restype
            f.argtypes = argtypes
        lib = Library(path, cdll)
        if not version_is_compatible(lib.version_tuple):
            raise LibraryLoadError(
                f"libsfr {lib.version} at {path} is not supported by this module (it needs "
                f"{SUPPORTED_VERSION[0]}.{SUPPORTED_VERSION[1]}.x); install the matching module or library"
            )
        _loaded[key] = lib
        return lib


# ---------------------------------------------------------------------------------------------
# Volumes


def volume_view(array: np.ndarray, ijk_to_ras, dtype_for_unsupported=np.float32):
    """A ``sfr_volume_view`` of a numpy ``[k, j, i]`` array with a Slicer IJK-to-RAS matrix.
    Returns ``(view, keep)``: ``keep`` is the (possibly converted) array the view points into,
    which must stay alive for as long as the library reads the view."""
    from .geometry import ijk_to_ras_to_lps_geometry, itk_dims

    a = np.asarray(array)
    dims = itk_dims(a.shape)
    if a.dtype.byteorder not in ("=", "|"):  # libsfr reads native-endian values
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype not in NUMPY_TO_SFR:
        a = a.astype(dtype_for_unsupported)
    a = np.ascontiguousarray(a)
    g = ijk_to_ras_to_lps_geometry(ijk_to_ras)
    view = SfrVolumeView()
    view.data = a.ctypes.data_as(c_void_p)
    view.data_len = a.nbytes
    view.dtype = NUMPY_TO_SFR[a.dtype]
    view.dims[:] = dims
    view.spacing[:] = g.spacing
    view.origin[:] = g.origin
    view.direction[:] = g.direction
    return view, a
