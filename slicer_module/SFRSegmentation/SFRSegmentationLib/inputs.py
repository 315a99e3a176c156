"""Training inputs: numpy arrays in Slicer's ``[k, j, i]`` order with their IJK-to-RAS matrices,
checked as they are added (messages name the case and the problem), the training config, and a
memory check before anything big is allocated in Slicer's process."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .geometry import ijk_to_ras_to_lps_geometry


class InputError(ValueError):
    """Inputs rejected before reaching the library (shapes, geometry, labels, classes)."""


# ---------------------------------------------------------------------------------------------
# Training data


@dataclass
class Case:
    case_id: str
    image: np.ndarray
    ijk_to_ras: np.ndarray
    label: Optional[np.ndarray] = None


def _check_image(what: str, array) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim != 3:
        hint = " (a vector or RGB volume? use a scalar volume)" if a.ndim == 4 else ""
        raise InputError(f"{what}: expected a 3D array [k, j, i], got {a.ndim} dimensions, shape {a.shape}{hint}")
    if a.size == 0:
        raise InputError(f"{what}: empty array, shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.issubdtype(a.dtype, np.complexfloating):
        raise InputError(f"{what}: voxel type {a.dtype} is not a real number type")
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise InputError(f"{what}: the image contains NaN or infinite voxels")
    return a


def _check_matrix(what: str, m) -> np.ndarray:
    try:
        g = ijk_to_ras_to_lps_geometry(m)
    except ValueError as e:
        raise InputError(f"{what}: {e}") from e
    d = g.direction_matrix()
    # Slicer volumes always have orthonormal axes; a sheared matrix is a caller's mistake that
    # libsfr (like ITK) would refuse anyway.
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        raise InputError(f"{what}: the IJK-to-RAS axes are not orthogonal (a sheared matrix); volumes need orthogonal axes")
    return np.array(m, dtype=float)


class TrainingData:
    """Labelled (image + label) and unlabelled images with their geometry, checked as they are
    added so that mistakes are reported with the case's name before any work starts. Arrays are
    kept by reference until the job starts (it copies them)."""

    def __init__(self, classes: Union[Dict[int, str], List[str]]):
        if isinstance(classes, (list, tuple)):
            classes = {i: n for i, n in enumerate(classes)}
        cleaned: Dict[int, str] = {}
        for k, v in dict(classes).items():
            try:
                idx = int(k)
            except (TypeError, ValueError):
                raise InputError(f"class index {k!r} is not an integer")
            if idx < 0 or idx > 65535:
                raise InputError(f"class index {idx} is outside 0..65535")
            name = str(v).strip()
            if not name:
                raise InputError(f"class {idx} has an empty name")
            cleaned[idx] = name
        if 0 not in cleaned:
            raise InputError("the classes must include 0 (background)")
        if len(cleaned) < 2:
            raise InputError("at least one foreground class is needed besides background (0)")
        if sorted(cleaned) != list(range(len(cleaned))):
            raise InputError(f"class indices must be 0..{len(cleaned) - 1} without gaps, got {sorted(cleaned)}")
        self.classes = dict(sorted(cleaned.items()))
        self.labeled: List[Case] = []
        self.unlabeled: List[Case] = []
        self._ids: set = set()  # every id handed out, also for cases checked but kept elsewhere

    @property
    def max_class(self) -> int:
        return max(self.classes)

    def _new_id(self, case_id: Optional[str], prefix: str) -> str:
        taken = {c.case_id for c in self.labeled + self.unlabeled} | self._ids
        if case_id:
            if case_id in taken:
                raise InputError(f"case id '{case_id}' is used twice")
            self._ids.add(case_id)
            return case_id
        n = len([i for i in taken if i.startswith(prefix + "_")]) + 1
        while f"{prefix}_{n:03d}" in taken:
            n += 1
        self._ids.add(f"{prefix}_{n:03d}")
        return f"{prefix}_{n:03d}"

    # Where the cases go: kept in memory here (in-process training copies them into libsfr);
    # worker.DecathlonWriter, the other sink, writes each one to a file as it arrives.
    holds_all = True

    def add_labeled(self, image, label, ijk_to_ras, label_ijk_to_ras=None, case_id: Optional[str] = None) -> str:
        """Adds an image with its label map (same shape; label geometry, when given, must match
        the image's). Returns the case id."""
        case = self.check_labeled(image, label, ijk_to_ras, label_ijk_to_ras, case_id)
        self.labeled.append(case)
        return case.case_id

    def check_labeled(self, image, label, ijk_to_ras, label_ijk_to_ras=None, case_id: Optional[str] = None) -> Case:
        """The checks of ``add_labeled``, without keeping the case."""
        cid = self._new_id(case_id, "labeled")
        img = _check_image(f"labelled case '{cid}', image", image)
        m = _check_matrix(f"labelled case '{cid}', image geometry", ijk_to_ras)
        lab = np.asarray(label)
        if lab.ndim != 3:
            raise InputError(f"labelled case '{cid}': the label must be a 3D array [k, j, i], got shape {lab.shape}")
        if lab.shape != img.shape:
            raise InputError(
                f"labelled case '{cid}': label shape {lab.shape} differs from image shape {img.shape} "
                "(the segmentation must be exported on the volume's grid)"
            )
        if label_ijk_to_ras is not None:
            lm = _check_matrix(f"labelled case '{cid}', label geometry", label_ijk_to_ras)
            g, lg = ijk_to_ras_to_lps_geometry(m), ijk_to_ras_to_lps_geometry(lm)
            if not g.is_close(lg):
                raise InputError(
                    f"labelled case '{cid}': the label's geometry differs from the image's "
                    f"(origin {np.round(lg.origin, 3).tolist()} vs {np.round(g.origin, 3).tolist()}, "
                    f"spacing {np.round(lg.spacing, 4).tolist()} vs {np.round(g.spacing, 4).tolist()}); "
                    "export the segmentation with the volume as reference geometry"
                )
        self._check_label_values(cid, lab)
        return Case(cid, img, m, lab)

    def _check_label_values(self, cid: str, lab: np.ndarray) -> None:
        if lab.dtype == np.bool_:
            return
        if not np.issubdtype(lab.dtype, np.number) or np.issubdtype(lab.dtype, np.complexfloating):
            raise InputError(f"labelled case '{cid}': label voxel type {lab.dtype} is not a number type")
        if np.issubdtype(lab.dtype, np.floating) and not np.all(np.mod(lab, 1) == 0):
            raise InputError(f"labelled case '{cid}': the label has non-integer values (a label map holds class indices)")
        lo, hi = lab.min(), lab.max()
        if lo < 0 or hi > self.max_class:
            raise InputError(
                f"labelled case '{cid}': label values span {lo}..{hi}, outside the classes 0..{self.max_class} "
                f"({', '.join(f'{k}={v}' for k, v in self.classes.items())})"
            )
        if hi == 0:
            raise InputError(f"labelled case '{cid}': the label is empty (background only)")

    def add_unlabeled(self, image, ijk_to_ras, case_id: Optional[str] = None) -> str:
        case = self.check_unlabeled(image, ijk_to_ras, case_id)
        self.unlabeled.append(case)
        return case.case_id

    def check_unlabeled(self, image, ijk_to_ras, case_id: Optional[str] = None) -> Case:
        cid = self._new_id(case_id, "unlabeled")
        img = _check_image(f"unlabelled case '{cid}', image", image)
        m = _check_matrix(f"unlabelled case '{cid}', geometry", ijk_to_ras)
        return Case(cid, img, m)

    def counts(self) -> tuple:
        return len(self.labeled), len(self.unlabeled)

    def label_dtype(self):
        return np.uint8 if self.max_class <= 255 else np.uint16

    def label_array(self, case: Case) -> np.ndarray:
        return np.ascontiguousarray(case.label, dtype=self.label_dtype())

    def check_ready(self) -> None:
        if not self.labeled:
            raise InputError("no labelled case: add at least one image with its segmentation")


# The config's `normalization`, with the words the panel shows for each.
NORMALIZATIONS = ("auto", "zscore", "ct")
NORMALIZATION_LABELS = {
    "auto": "Automatic: CT where the labelled images' DICOM modality is CT",
    "zscore": "Z-score per volume (MRI and most other scans)",
    "ct": "CT: one window from the labelled cases (Hounsfield units)",
}


def _check_normalization(choice: str) -> None:
    if choice not in NORMALIZATIONS:
        raise InputError(f"intensity normalisation {choice!r} is not one of {', '.join(NORMALIZATIONS)}")


def dicom_modality(node, database) -> Optional[str]:
    """The DICOM modality (0008,0060: "CT", "MR", ...) of a volume node loaded from DICOM, read
    from Slicer's DICOM database through the node's "DICOM.instanceUIDs"; None where the node did
    not come from DICOM, there is no database, or the database no longer has its files."""
    if node is None or database is None:
        return None
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        return None
    try:
        path = database.fileForInstance(uids[0])
        value = database.fileValue(path, "0008,0060") if path else ""
    except Exception:  # a database closed or moved: unknown, not an error
        return None
    return (value or "").strip() or None


def resolve_normalization(choice: str, modalities: Sequence[Optional[str]]) -> Tuple[str, str]:
    """The config's ``normalization`` for the panel's ``choice`` and the DICOM modalities of the
    labelled images (None where unknown), and why, for the log. "auto" becomes "ct" when every
    labelled image is a DICOM CT; with no modality known it stays "auto", so that the library
    still warns when the intensities look like Hounsfield units."""
    _check_normalization(choice)
    if choice != "auto":
        return choice, f"chosen in the panel: {NORMALIZATION_LABELS[choice]}"
    known = sorted({m.upper() for m in modalities if m})
    if modalities and known == ["CT"] and all(modalities):
        return "ct", "every labelled image is a DICOM CT: one window from the labelled cases"
    if "CT" in known:
        return "auto", (f"the labelled images' DICOM modalities are mixed or partly unknown ({', '.join(m or 'unknown' for m in modalities)}): "
                        "z-score per volume; choose CT in the panel if they are all CT")
    if known:
        return "zscore", f"the labelled images are DICOM {', '.join(known)}, not CT: z-score per volume"
    return "auto", "the labelled images carry no DICOM modality: z-score per volume (choose CT in the panel for CT scans)"


def build_config(config: Optional[dict] = None, preset: Optional[str] = None, method: Optional[str] = None,
                 sam_checkpoint: Optional[str] = None, use_sam: Optional[bool] = None, device: Optional[str] = None,
                 normalization: Optional[str] = None) -> dict:
    """The JSON document for ``sfr_train_start``: a full config (has "version") with the given
    fields replaced, or ``{"preset": NAME, ...overrides}``. The library rejects unknown keys."""
    cfg = json.loads(json.dumps(config or {}))  # deep copy, and proves it is JSON
    if normalization is not None:
        _check_normalization(normalization)
        cfg["normalization"] = normalization
    if preset is not None:
        if "version" in cfg:
            raise InputError("a full config (with \"version\") cannot be combined with a preset")
        cfg["preset"] = preset
    if method is not None:
        cfg["method"] = method
    if use_sam is not None:
        cfg["sfr"] = bool(use_sam)
    if device is not None:
        cfg["device"] = device
    if sam_checkpoint:
        p = Path(sam_checkpoint).expanduser()
        if not p.is_file():
            raise InputError(f"SAM checkpoint {p} does not exist")
        cfg.setdefault("sam", {})["checkpoint"] = str(p)
    return cfg



# ---------------------------------------------------------------------------------------------
# Memory: an allocation that cannot fit must be an error message, not the out-of-memory killer
# taking Slicer (and the unsaved scene) down.


def available_memory_bytes() -> Optional[int]:
    """Memory that can be allocated without swapping, or None where the system does not say
    (then no check is made; ``MEMORY_CHECK_UNAVAILABLE`` is the message to show). Linux:
    ``MemAvailable`` of /proc/meminfo; Windows: GlobalMemoryStatusEx's ullAvailPhys; other
    POSIX systems that have it: sysconf's available pages (macOS has no such call in the
    standard library: None there)."""
    import os
    import sys

    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if sys.platform.startswith("win"):
        try:
            import ctypes

            class MEMORYSTATUSEX(ctypes.Structure):
                _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong), ("ullTotalPhys", ctypes.c_ulonglong),
                            ("ullAvailPhys", ctypes.c_ulonglong), ("ullTotalPageFile", ctypes.c_ulonglong),
                            ("ullAvailPageFile", ctypes.c_ulonglong), ("ullTotalVirtual", ctypes.c_ulonglong),
                            ("ullAvailVirtual", ctypes.c_ulonglong), ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

            status = MEMORYSTATUSEX()
            status.dwLength = ctypes.sizeof(MEMORYSTATUSEX)
            if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
                return int(status.ullAvailPhys)
        except (AttributeError, OSError):
            return None
        return None
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


MEMORY_CHECK_UNAVAILABLE = (
    "this system does not report the memory available, so the training data is not checked against it "
    "(a case too big for the memory may make the system swap or end Slicer)"
)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_memory(needed: int, what: str, hint: str = "", available: Optional[int] = None) -> None:
    """Raises InputError when ``needed`` bytes are more than the memory available now."""
    avail = available_memory_bytes() if available is None else available
    if avail is not None and needed > avail:
        raise InputError(
            f"{what} needs about {_gb(needed)} of memory, but only {_gb(avail)} is available"
            + (f": {hint}" if hint else "")
        )


# Bytes per voxel that training in Slicer's process adds (libsfr keeps each case as float32
# image + uint8 label, and the training loads a z-scored float32 copy plus the label).
NATIVE_TRAINING_BYTES_PER_VOXEL = 10
# Worker mode: the NIfTI files are written from the arrays already held, one at a time.
WORKER_TRAINING_BYTES_PER_VOXEL = 0


def training_memory_bytes(data: "TrainingData", per_voxel: int) -> int:
    return sum(c.image.size for c in data.labeled + data.unlabeled) * per_voxel
