"""The module's logic without Slicer: training data from numpy arrays, training and
segmentation jobs, models and the model folder.

Arrays are Slicer's ``[k, j, i]`` (``slicer.util.arrayFromVolume``) with the volume's IJK-to-RAS
4x4 matrix. Every job has the same interface in both execution modes:

    job.poll()   -> {"stage", "step", "total", "loss", "eta_seconds", "message", "finished"}
                    (never blocks; loss/eta are None when unknown)
    job.cancel()    (returns at once; the job stops within seconds)
    job.wait()   -> the result; raises Cancelled or SfrError
    job.close()     (frees it; cancels it if still running)

``in-process`` runs the job on a libsfr thread through ctypes (ctypes releases the GIL during
library calls, so Python and the GUI keep running). ``worker`` runs the ``sfr`` tool in a child
process (see worker.py for why). ``auto`` picks ``worker`` when ``torch`` is already imported
in this Python, ``in-process`` otherwise.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import shutil
import sys
from ctypes import POINTER, byref, c_float, c_size_t
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np

from . import modelfile, worker
from .binding import (
    DTYPE_U8,
    DTYPE_U16,
    PROGRESS_CALLBACK,
    SFR_ERR_BUFFER_TOO_SMALL,
    Handle,
    Library,
    SfrError,
    SfrProgress,
    load_library,
    volume_view,
)
from .geometry import ijk_to_ras_to_lps_geometry

MODES = ("auto", "in-process", "worker")
METHODS = ("mean-teacher", "supervised", "self-training", "acmt")
PRESETS = ("cpu-small", "paper-la", "test-tiny")
MODEL_SUFFIX = ".sfrmodel"


def torch_already_loaded() -> bool:
    """True when this Python has imported PyTorch (another extension did ``import torch``);
    loading libsfr's own libtorch next to it is not safe."""
    return "torch" in sys.modules


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

    @property
    def max_class(self) -> int:
        return max(self.classes)

    def _new_id(self, case_id: Optional[str], prefix: str) -> str:
        taken = {c.case_id for c in self.labeled + self.unlabeled}
        if case_id:
            if case_id in taken:
                raise InputError(f"case id '{case_id}' is used twice")
            return case_id
        n = len(self.labeled if prefix == "labeled" else self.unlabeled) + 1
        while f"{prefix}_{n:03d}" in taken:
            n += 1
        return f"{prefix}_{n:03d}"

    def add_labeled(self, image, label, ijk_to_ras, label_ijk_to_ras=None, case_id: Optional[str] = None) -> str:
        """Adds an image with its label map (same shape; label geometry, when given, must match
        the image's). Returns the case id."""
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
        self.labeled.append(Case(cid, img, m, lab))
        return cid

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
        cid = self._new_id(case_id, "unlabeled")
        img = _check_image(f"unlabelled case '{cid}', image", image)
        m = _check_matrix(f"unlabelled case '{cid}', geometry", ijk_to_ras)
        self.unlabeled.append(Case(cid, img, m))
        return cid

    def counts(self) -> tuple:
        return len(self.labeled), len(self.unlabeled)

    def label_dtype(self):
        return np.uint8 if self.max_class <= 255 else np.uint16

    def label_array(self, case: Case) -> np.ndarray:
        return np.ascontiguousarray(case.label, dtype=self.label_dtype())

    def check_ready(self) -> None:
        if not self.labeled:
            raise InputError("no labelled case: add at least one image with its segmentation")


def build_config(config: Optional[dict] = None, preset: Optional[str] = None, method: Optional[str] = None,
                 sam_checkpoint: Optional[str] = None, use_sam: Optional[bool] = None, device: Optional[str] = None) -> dict:
    """The JSON document for ``sfr_train_start``: a full config (has "version") with the given
    fields replaced, or ``{"preset": NAME, ...overrides}``. The library rejects unknown keys."""
    cfg = json.loads(json.dumps(config or {}))  # deep copy, and proves it is JSON
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
# Jobs


class _Closing:
    """Closes itself on `with` exit and on garbage collection (close must be idempotent)."""

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Job(_Closing):
    """Common interface of training and segmentation jobs (see the module docstring)."""

    def poll(self) -> dict:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError

    def wait(self):
        raise NotImplementedError

    def close(self) -> None:
        pass

    @property
    def finished(self) -> bool:
        return bool(self.poll()["finished"])



class _NativeJob(Job):
    def __init__(self, library: Library, handle: Handle, keep=()):
        self._lib = library
        self._handle = handle
        self._keep = list(keep)  # objects the job reads: dataset, model, callback, arrays
        self._last = None

    def poll(self) -> dict:
        if not self._handle:
            return dict(self._last or {}, finished=True)
        p = SfrProgress()
        self._lib.call("sfr_job_poll", self._handle, byref(p))
        self._last = p.to_dict()
        return dict(self._last)

    def cancel(self) -> None:
        if self._handle:
            self._lib.call("sfr_job_cancel", self._handle)

    def close(self) -> None:
        if self._handle:
            self._lib.lib.sfr_job_free(self._handle)
            self._handle = None
        for k in self._keep:
            if hasattr(k, "free"):
                k.free()
        self._keep = []

    def _require(self) -> Handle:
        if not self._handle:
            raise SfrError("SFR_ERR_STATE", "the job's result was already taken")
        return self._handle


class _NativeDataset:
    """An ``sfr_dataset`` handle built from a TrainingData (the library copies the voxels)."""

    def __init__(self, library: Library, data: TrainingData):
        self._lib = library
        self.handle = Handle()
        classes = json.dumps({str(k): v for k, v in data.classes.items()})
        library.call("sfr_dataset_new", classes.encode("utf-8"), byref(self.handle))
        try:
            for case in data.labeled:
                img, keep_i = volume_view(case.image, case.ijk_to_ras)
                # The label takes the image's matrix: the two were checked to match, and
                # rounding differences must not make the library refuse the pair.
                lab, keep_l = volume_view(data.label_array(case), case.ijk_to_ras)
                library.call("sfr_dataset_add_labeled", self.handle, case.case_id.encode("utf-8"), byref(img), byref(lab))
                del keep_i, keep_l
            for case in data.unlabeled:
                img, keep_i = volume_view(case.image, case.ijk_to_ras)
                library.call("sfr_dataset_add_unlabeled", self.handle, case.case_id.encode("utf-8"), byref(img))
                del keep_i
        except Exception:
            self.free()
            raise

    def counts(self) -> tuple:
        labeled, unlabeled = c_size_t(), c_size_t()
        self._lib.call("sfr_dataset_counts", self.handle, byref(labeled), byref(unlabeled))
        return labeled.value, unlabeled.value

    def free(self) -> None:
        if self.handle:
            self._lib.lib.sfr_dataset_free(self.handle)
            self.handle = Handle()


class NativeTrainingJob(_NativeJob):
    def __init__(self, library: Library, data: TrainingData, config: dict,
                 on_progress: Optional[Callable[[dict], None]] = None):
        ds = _NativeDataset(library, data)
        handle = Handle()
        text = json.dumps(config).encode("utf-8")
        keep: list = []  # the callback object must outlive the job
        try:
            if on_progress is None:
                library.call("sfr_train_start", ds.handle, text, byref(handle))
            else:
                def trampoline(progress_ptr, _user):
                    # Runs on the library's job thread: never let an exception unwind into C.
                    try:
                        on_progress(progress_ptr.contents.to_dict())
                    except Exception:
                        pass

                cb = PROGRESS_CALLBACK(trampoline)
                keep.append(cb)
                library.call("sfr_train_start_with_callback", ds.handle, text, cb, None, byref(handle))
        finally:
            # The job trains on its own copy of the cases (sfr.h): the dataset's memory can go.
            ds.free()
        super().__init__(library, handle, keep)

    def wait(self) -> "Model":
        out = Handle()
        try:
            self._lib.call("sfr_job_wait", self._require(), byref(out))
        finally:
            self.close()
        return NativeModel(self._lib, out, path=None)


class NativeSegmentationJob(_NativeJob):
    def __init__(self, model: "NativeModel", array: np.ndarray, ijk_to_ras):
        a = _check_image("image to segment", array)
        view, keep = volume_view(a, _check_matrix("image to segment, geometry", ijk_to_ras))
        handle = Handle()
        model._lib.call("sfr_segment_start", model._require(), byref(view), byref(handle))
        del keep  # the library copied the image
        self._shape = a.shape
        self._model = model  # must outlive the job
        super().__init__(model._lib, handle)

    def wait(self) -> np.ndarray:
        dt, code = self._model.label_dtype()
        out = np.zeros(self._shape, dtype=dt)
        try:
            self._lib.call("sfr_job_wait_segmentation", self._require(), code, out.ctypes.data_as(ctypes.c_void_p), out.nbytes, None, 0)
        finally:
            self.close()
        return out


class WorkerTrainingJob(Job):
    def __init__(self, cli: Path, data: TrainingData, config: dict, work_root: Optional[str] = None):
        self._dir = worker.make_temp_dir("sfr-train-", work_root)
        try:
            n_labeled = worker.write_decathlon(self._dir / "data", data)
            self._out = self._dir / "out" / ("model" + MODEL_SUFFIX)
            self._out.parent.mkdir()
            argv = worker.train_argv(cli, self._dir / "data", n_labeled, self._out, config)
            self._proc = worker.WorkerProcess(argv, self._dir)
        except Exception:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._cli = cli
        self._done = False

    def poll(self) -> dict:
        return self._proc.poll()

    def cancel(self) -> None:
        self._proc.cancel()

    def log_tail(self, n: int = 40) -> str:
        return self._proc.log_tail(n)

    def wait(self, timeout: Optional[float] = None) -> "Model":
        if self._done:
            raise SfrError("SFR_ERR_STATE", "the job's result was already taken")
        try:
            self._proc.wait(timeout)
            # The model outlives this job's folder: move it into a folder of its own.
            model_dir = worker.make_temp_dir("sfr-model-", str(self._dir.parent))
            target = model_dir / self._out.name
            shutil.move(str(self._out), str(target))
            return WorkerModel(self._cli, target, owned_dir=model_dir)
        finally:
            self._done = True
            self.close()

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            proc.close()
        d = getattr(self, "_dir", None)
        if d is not None and d.exists():
            shutil.rmtree(d, ignore_errors=True)


class WorkerSegmentationJob(Job):
    def __init__(self, model: "WorkerModel", array: np.ndarray, ijk_to_ras, device: Optional[str] = None, work_root: Optional[str] = None):
        a = _check_image("image to segment", array)
        m = _check_matrix("image to segment, geometry", ijk_to_ras)
        self._dir = worker.make_temp_dir("sfr-segment-", work_root)
        self._shape, self._matrix = a.shape, m
        self._done = False
        try:
            worker.nifti.write(self._dir / "image.nii", a, m)
            argv = [str(model.cli), "segment", "--model", str(model.path), "--input", str(self._dir / "image.nii"),
                    "--output", str(self._dir / "labels.nii"), "--progress", "json"]
            if device:
                argv += ["--device", device]
            self._proc = worker.WorkerProcess(argv, self._dir)
        except Exception:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._model = model

    def poll(self) -> dict:
        return self._proc.poll()

    def cancel(self) -> None:
        self._proc.cancel()

    def wait(self, timeout: Optional[float] = None) -> np.ndarray:
        if self._done:
            raise SfrError("SFR_ERR_STATE", "the job's result was already taken")
        try:
            self._proc.wait(timeout)
            labels = worker.read_segmentation(self._dir / "labels.nii", self._shape, self._matrix)
            dt, _ = self._model.label_dtype()
            return np.ascontiguousarray(labels, dtype=dt)
        finally:
            self._done = True
            self.close()

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            proc.close()
        d = getattr(self, "_dir", None)
        if d is not None and d.exists():
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Models


class Model(_Closing):
    """A trained model. ``segment`` returns a label array with the image's shape ``[k, j, i]``
    (uint8; uint16 beyond 256 classes) on the image's own grid: the caller gives the result
    the same IJK-to-RAS matrix as the image."""

    path: Optional[Path] = None

    @staticmethod
    def load(path, logic: Optional["SFRLogic"] = None) -> "Model":
        return (logic or SFRLogic()).load_model(path)

    def metadata(self) -> dict:
        raise NotImplementedError

    def save(self, path) -> Path:
        raise NotImplementedError

    def start_segmentation(self, array, ijk_to_ras) -> Job:
        raise NotImplementedError

    def segment(self, array, ijk_to_ras) -> np.ndarray:
        job = self.start_segmentation(array, ijk_to_ras)
        return job.wait()

    def close(self) -> None:
        pass

    # Derived from the metadata.
    def class_names(self) -> Dict[int, str]:
        return modelfile.class_names(self.metadata())

    @property
    def num_classes(self) -> int:
        return max(self.class_names()) + 1

    def label_dtype(self):
        return (np.uint8, DTYPE_U8) if self.num_classes <= 256 else (np.uint16, DTYPE_U16)

    def validation_dice(self) -> Optional[float]:
        return modelfile.validation_dice(self.metadata())

    def summary(self) -> str:
        return modelfile.summary(self.metadata())



class NativeModel(Model):
    def __init__(self, library: Library, handle: Handle, path: Optional[Path]):
        self._lib = library
        self._handle = handle
        self.path = Path(path) if path else None
        self._meta = None

    @classmethod
    def load_file(cls, library: Library, path, device: Optional[str] = None) -> "NativeModel":
        handle = Handle()
        library.call("sfr_model_load", str(path).encode("utf-8"), device.encode("utf-8") if device else None, byref(handle))
        return cls(library, handle, Path(path))

    def _require(self) -> Handle:
        if not self._handle:
            raise SfrError("SFR_ERR_BAD_HANDLE", "the model was closed")
        return self._handle

    def metadata(self) -> dict:
        if self._meta is None:
            size = 64 * 1024
            for _ in range(2):
                buf = ctypes.create_string_buffer(size)
                needed = c_size_t()
                status = self._lib.lib.sfr_model_metadata_json(self._require(), buf, size, byref(needed))
                if status == SFR_ERR_BUFFER_TOO_SMALL and needed.value > size:
                    size = needed.value
                    continue
                self._lib.check(status, "sfr_model_metadata_json")
                self._meta = json.loads(buf.value.decode("utf-8"))
                break
            else:
                raise SfrError("SFR_ERR_BUFFER_TOO_SMALL", "metadata size kept changing")
        return json.loads(json.dumps(self._meta))

    @property
    def num_classes(self) -> int:
        n = c_size_t()
        self._lib.call("sfr_model_num_classes", self._require(), byref(n))
        return n.value

    def save(self, path) -> Path:
        path = Path(path)
        self._lib.call("sfr_model_save", self._require(), str(path).encode("utf-8"))
        if self.path is None:
            self.path = path
        return path

    def start_segmentation(self, array, ijk_to_ras) -> Job:
        return NativeSegmentationJob(self, array, ijk_to_ras)

    def segment(self, array, ijk_to_ras, probabilities: bool = False):
        """Synchronous segmentation; with ``probabilities`` also returns the class
        probabilities as float32 ``[class, k, j, i]``."""
        a = _check_image("image to segment", array)
        view, keep = volume_view(a, _check_matrix("image to segment, geometry", ijk_to_ras))
        dt, code = self.label_dtype()
        out = np.zeros(a.shape, dtype=dt)
        probs = np.zeros((self.num_classes,) + a.shape, dtype=np.float32) if probabilities else None
        self._lib.call(
            "sfr_segment",
            self._require(),
            byref(view),
            code,
            out.ctypes.data_as(ctypes.c_void_p),
            out.nbytes,
            probs.ctypes.data_as(POINTER(c_float)) if probs is not None else None,
            probs.size if probs is not None else 0,
        )
        del keep
        return (out, probs) if probabilities else out

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.lib.sfr_model_free(self._handle)
            self._handle = None


class WorkerModel(Model):
    """A model file used through the ``sfr`` tool. ``owned_dir``: a temporary folder holding a
    freshly trained model, removed when the model is closed (save it first)."""

    def __init__(self, cli: Path, path, owned_dir: Optional[Path] = None, device: Optional[str] = None, work_root: Optional[str] = None):
        self.cli = Path(cli)
        self.path = Path(path)
        self._owned_dir = owned_dir
        self._device = device
        self._work_root = work_root
        self._meta = modelfile.read_metadata(self.path)  # fails early on a non-model file

    def metadata(self) -> dict:
        return json.loads(json.dumps(self._meta))

    def save(self, path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        shutil.copyfile(self.path, tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a model
        if self._owned_dir is not None:
            self.close()
            self.path = path
        return path

    def start_segmentation(self, array, ijk_to_ras) -> Job:
        return WorkerSegmentationJob(self, array, ijk_to_ras, self._device, self._work_root)

    def close(self) -> None:
        d = getattr(self, "_owned_dir", None)
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
            self._owned_dir = None


# ---------------------------------------------------------------------------------------------
# Entry point


class SFRLogic:
    """Chooses the execution mode and finds the library or the tool.

    ``library_path``: explicit libsfr path (the module's setting), else ``$SFR_LIBRARY``, else
    next to the module. ``cli_path``: the ``sfr`` tool for worker mode (else ``$SFR_CLI``, next
    to the library, next to the module, PATH). ``device``: "cpu", "cuda" or "auto" for loading
    models; None leaves it to the library (training devices come from the config)."""

    def __init__(self, library_path: Optional[str] = None, mode: str = "auto", cli_path: Optional[str] = None,
                 device: Optional[str] = None, work_root: Optional[str] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.library_path = library_path
        self.cli_path = cli_path
        self.requested_mode = mode
        self.device = device
        self.work_root = work_root
        self._library: Optional[Library] = None
        self._cli: Optional[Path] = None
        self._cli_version: Optional[str] = None

    @property
    def mode(self) -> str:
        if self.requested_mode != "auto":
            return self.requested_mode
        return "worker" if torch_already_loaded() else "in-process"

    @property
    def library(self) -> Library:
        if self._library is None:
            self._library = load_library(self.library_path)
        return self._library

    @property
    def cli(self) -> Path:
        if self._cli is None:
            lib_hint = self.library_path or (str(self._library.path) if self._library else None)
            cli = worker.find_cli(self.cli_path, lib_hint)
            self._cli_version = worker.cli_version(cli)
            self._cli = cli
        return self._cli

    def describe(self) -> dict:
        """Where the work runs and with what: {"mode", "path", "version"} (loads on first use)."""
        if self.mode == "in-process":
            lib = self.library
            return {"mode": "in-process", "path": str(lib.path), "version": lib.version}
        cli = self.cli
        return {"mode": "worker", "path": str(cli), "version": self._cli_version}

    def start_training(self, data: TrainingData, config: Optional[dict] = None, preset: Optional[str] = None,
                       method: Optional[str] = None, sam_checkpoint: Optional[str] = None,
                       use_sam: Optional[bool] = None, device: Optional[str] = None,
                       on_progress: Optional[Callable[[dict], None]] = None) -> Job:
        """Starts training; returns at once with a job whose ``wait()`` gives the Model.
        ``on_progress`` (in-process only) is called from the library's thread: do not touch
        a GUI from it; poll instead."""
        data.check_ready()
        cfg = build_config(config, preset, method, sam_checkpoint, use_sam, device)
        if self.mode == "in-process":
            return NativeTrainingJob(self.library, data, cfg, on_progress)
        if on_progress is not None:
            raise ValueError("on_progress is not available in worker mode: poll the job")
        return WorkerTrainingJob(self.cli, data, cfg, self.work_root)

    def load_model(self, path) -> Model:
        path = Path(path).expanduser()
        if not path.is_file():
            raise InputError(f"model file {path} does not exist")
        if self.mode == "in-process":
            return NativeModel.load_file(self.library, path, self.device)
        return WorkerModel(self.cli, path, device=self.device, work_root=self.work_root)


# ---------------------------------------------------------------------------------------------
# The model folder


@dataclass
class ModelEntry:
    name: str
    path: Path
    metadata: dict = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def validation_dice(self) -> Optional[float]:
        return modelfile.validation_dice(self.metadata) if not self.error else None

    @property
    def created(self) -> Optional[datetime.datetime]:
        if not self.error:
            t = modelfile.created(self.metadata)
            if t:
                return t
        try:
            return datetime.datetime.fromtimestamp(self.path.stat().st_mtime)
        except OSError:
            return None

    @property
    def class_names(self) -> Dict[int, str]:
        return modelfile.class_names(self.metadata) if not self.error else {}

    @property
    def summary(self) -> str:
        return self.error or modelfile.summary(self.metadata)


def safe_model_name(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_. " else "_" for c in name).strip(" .")
    return out[:100] or "model"


class ModelRegistry:
    """The ``.sfrmodel`` files of a folder the user chose. Listing reads only file headers (no
    library needed); unreadable files are listed with their error rather than hidden."""

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()

    def list(self) -> List[ModelEntry]:
        if not self.folder.is_dir():
            return []
        out = []
        for p in sorted(self.folder.glob("*" + MODEL_SUFFIX)):
            try:
                out.append(ModelEntry(p.name[: -len(MODEL_SUFFIX)], p, modelfile.read_metadata(p)))
            except modelfile.ModelFileError as e:
                out.append(ModelEntry(p.name[: -len(MODEL_SUFFIX)], p, {}, str(e)))
        out.sort(key=lambda e: e.created or datetime.datetime.min, reverse=True)
        return out

    def path_for(self, name: str) -> Path:
        return self.folder / (safe_model_name(name) + MODEL_SUFFIX)

    def unique_name(self, base: str) -> str:
        base = safe_model_name(base)
        name, n = base, 2
        while self.path_for(name).exists():
            name, n = f"{base}-{n}", n + 1
        return name

    def default_name(self, model: Model) -> str:
        method = (model.metadata().get("training") or {}).get("method", "model")
        return self.unique_name(f"{method}-{datetime.datetime.now():%Y%m%d-%H%M%S}")

    def add(self, model: Model, name: Optional[str] = None) -> ModelEntry:
        """Saves a model into the folder under a new unique name (never overwrites)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = self.unique_name(name) if name else self.default_name(model)
        path = model.save(self.path_for(name))
        return ModelEntry(name, path, modelfile.read_metadata(path))

    def entry(self, name: str) -> ModelEntry:
        for e in self.list():
            if e.name == name:
                return e
        raise KeyError(f"no model named '{name}' in {self.folder}")

    def remove(self, name: str) -> None:
        """Deletes a model file of this folder (and its training work folder, if any)."""
        p = self.folder / (name + MODEL_SUFFIX)
        if any(sep in name for sep in ("/", "\\")) or name in ("", ".", "..") or not p.is_file():
            raise KeyError(f"no model named '{name}' in {self.folder}")
        p.unlink()
        work = p.with_name(p.name + ".work")
        if work.is_dir():
            shutil.rmtree(work, ignore_errors=True)

    def load(self, name: str, logic: SFRLogic) -> Model:
        return logic.load_model(self.entry(name).path)
