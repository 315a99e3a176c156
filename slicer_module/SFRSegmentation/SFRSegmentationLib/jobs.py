"""The job and model interfaces shared by both execution modes, and ``DeferredJob``: a job whose
preparation (checks, copies, file writes, model loading) runs on a helper thread, so that the
thread that starts it (Slicer's GUI thread) returns at once.

Every job:

    job.poll()   -> {"stage", "step", "total", "loss", "eta_seconds", "message", "finished"}
                    (never blocks; loss/eta are None when unknown)
    job.cancel()    (returns at once; the job stops within seconds)
    job.wait()   -> the result; raises Cancelled or SfrError (or the preparation's error)
    job.close()     (frees it; cancels it if still running)
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from . import modelfile
from .binding import DTYPE_U8, DTYPE_U16, Cancelled


def progress(stage: str, message: str = "", step: int = 0, total: int = 0, finished: bool = False) -> dict:
    return {"stage": stage, "step": step, "total": total, "loss": None, "eta_seconds": None,
            "message": message, "finished": finished}


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
    """Common interface of training and segmentation jobs (see the module docstring).
    ``warnings``: what the job warned about (worker mode: the tool's warnings), for a log."""

    warnings: list = []

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


class Reporter:
    """Handed to a DeferredJob's start function: ``report(message, step, total)`` shows progress
    of the "prepare" stage; ``check()`` raises Cancelled once the job was cancelled."""

    def __init__(self):
        self._lock = threading.Lock()
        self._p = progress("prepare", "preparing")
        self.cancelled = threading.Event()

    def report(self, message: str, step: int = 0, total: int = 0) -> None:
        with self._lock:
            self._p = progress("prepare", message, step, total)
        self.check()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("cancelled while preparing")

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._p)


class DeferredJob(Job):
    """Runs ``start(reporter) -> Job`` on a helper thread, then behaves as that job. Until the
    inner job exists, ``poll`` reports the "prepare" stage; a cancel before then stops the
    preparation (at its next ``reporter.check``) and the inner job, if it still got started."""

    def __init__(self, start: Callable[[Reporter], Job], name: str = "sfr-prepare"):
        self._reporter = Reporter()
        self._inner: Optional[Job] = None
        self._error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._taken = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, args=(start,), name=name, daemon=True)
        self._thread.start()

    def _run(self, start) -> None:
        try:
            inner = start(self._reporter)
        except BaseException as e:  # reported by wait(), never lost in a thread
            self._error = e
            return
        with self._lock:
            self._inner = inner
            if self._reporter.cancelled.is_set():
                inner.cancel()
            if self._closed:
                inner.close()

    def poll(self) -> dict:
        with self._lock:
            inner = self._inner
        if inner is not None:
            return inner.poll()
        p = self._reporter.snapshot()
        if not self._thread.is_alive():
            p["finished"] = True
            if self._error is not None:
                p["message"] = str(self._error)
        return p

    def cancel(self) -> None:
        with self._lock:
            self._reporter.cancelled.set()
            inner = self._inner
        if inner is not None:
            inner.cancel()

    @property
    def warnings(self) -> list:
        with self._lock:
            inner = self._inner
        return list(getattr(inner, "warnings", [])) if inner is not None else []

    def wait(self):
        self._thread.join()
        if self._taken:
            from .binding import SfrError

            raise SfrError("SFR_ERR_STATE", "the job's result was already taken")
        self._taken = True
        if self._error is not None:
            raise self._error
        try:
            return self._inner.wait()
        finally:
            self._inner.close()

    def close(self) -> None:
        # Never blocks (a GUI closes jobs): a preparation still running is cancelled, and its
        # thread closes the job it may still start.
        if getattr(self, "_thread", None) is None:
            return
        self.cancel()
        with self._lock:
            self._closed = True
            inner = self._inner
        if inner is not None:
            inner.close()


def close_in_background(job: Job, name: str = "sfr-close") -> threading.Thread:
    """Cancels ``job`` now and frees it on a helper thread; returns that thread. For callers
    that must not block (a GUI's cleanup): freeing an in-process job joins the library's
    thread, which ends only seconds after a cancel."""
    job.cancel()
    t = threading.Thread(target=job.close, name=name, daemon=True)
    t.start()
    return t


class Model(_Closing):
    """A trained model. ``segment`` returns a label array with the image's shape ``[k, j, i]``
    (uint8; uint16 beyond 256 classes) on the image's own grid: the caller gives the result
    the same IJK-to-RAS matrix as the image."""

    path: Optional[Path] = None

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

