"""In-process mode: jobs and models on libsfr through ctypes. ctypes releases the GIL during
library calls, and the jobs run on the library's own threads, so Python and the GUI keep
running. Opt-in only inside Slicer (see logic.py for why the worker process is the default)."""
from __future__ import annotations

import ctypes
import json
from ctypes import POINTER, byref, c_float, c_size_t
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .binding import PROGRESS_CALLBACK, SFR_ERR_BUFFER_TOO_SMALL, Handle, Library, SfrError, SfrProgress, volume_view
from .inputs import TrainingData, _check_image, _check_matrix
from .jobs import Job, Model


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
