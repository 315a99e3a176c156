"""Work that must touch the scene, cut into short GUI-thread slices.

MRML is not thread-safe, so reading a volume's voxels or adding segments has to happen on
Slicer's GUI thread; but a 512x512x300 volume copied or imported in one go freezes Slicer for
one to two seconds. Such work is written as a generator: every ``yield`` ends one GUI-thread
slice, and between slices the GUI runs. A slice can hand heavy work that needs no scene
(numpy on arrays of our own, building VTK objects that are in no scene, file I/O) to a helper
thread by yielding ``Background(function)``: ``step()`` returns at once while it runs, and the
generator resumes with its result (or its exception raised at the ``yield``) once it is done.

``Task.step()`` is what a timer calls (the panel's QTimer, every 100 ms); ``Task.run()`` runs a
task to its end in the calling thread (scripts, tests, the synchronous helpers in scene.py).
No Qt here, so the slicing is tested without it: ``Task.slices`` counts the GUI-thread slices
and ``Task.longest_slice`` measures the longest one.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Generator, Optional

from .binding import Cancelled

# Bytes a slice may copy out of (or into) scene memory. A copy into memory that is already
# mapped runs at several GB/s, so 32 MB is a few to a few tens of milliseconds, far below the
# 0.2 s a GUI slice may take. Destination arrays are allocated (and their pages touched) on a
# helper thread first: the page faults of a fresh 150 MB array alone took 0.5 s here.
SLICE_BYTES = 32 * 1024 * 1024


class Background:
    """``function()`` running on a helper thread; yielded by a task to wait for its result."""

    def __init__(self, function: Callable[[], object], name: str = "sfr-background"):
        self.result = None
        self.error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._ended = False
        self._discard: Optional[Callable[[object], None]] = None
        self._thread = threading.Thread(target=self._run, args=(function,), name=name, daemon=True)
        self._thread.start()

    def _run(self, function) -> None:
        try:
            self.result = function()
        except BaseException as e:  # handed to the task at its yield, never lost in the thread
            self.error = e
        with self._lock:
            self._ended = True
            discard = self._discard
        if discard is not None and self.error is None:
            discard(self.result)

    def discard(self, callback: Callable[[object], None]) -> None:
        """No one will take the result: ``callback(result)`` frees it (a model's temporary
        folder, say) once the function has returned, now if it already has."""
        with self._lock:
            ended = self._ended
            self._discard = callback
        if ended and self.error is None:
            callback(self.result)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()


class Task:
    """Runs a generator one GUI-thread slice per ``step()``. The generator yields None or a
    progress message (str) to end a slice, or a ``Background`` to wait for; its return value is
    ``result``, its exception ``error`` (re-raised by ``take()``)."""

    def __init__(self, generator: Generator, what: str = "", cancellable: bool = True,
                 discard: Optional[Callable[[object], None]] = None):
        self._gen = generator
        # cancellable=False: work that must end as it started (a model being saved is kept,
        # never half-written); discard: frees a helper thread's result that a cancel orphans.
        self.cancellable = cancellable
        self._discard = discard
        self.what = what
        self.message = what
        self.finished = False
        self.result = None
        self.error: Optional[BaseException] = None
        self.slices = 0
        self.longest_slice = 0.0
        self._waiting: Optional[Background] = None
        self._cancelled = False

    def cancel(self) -> bool:
        """Stops at the next step: the generator gets GeneratorExit at its current yield (its
        ``finally`` blocks clean up); a helper thread still running is left to end alone, and
        its result goes to ``discard``. False (and nothing stops) for a task that is not
        cancellable."""
        if not self.cancellable or self.finished:
            return False
        self._cancelled = True
        return True

    def step(self) -> bool:
        """One slice; True while the task is not finished. Returns at once while a helper
        thread runs."""
        if self.finished:
            return False
        if self._cancelled:
            if self._waiting is not None and self._discard is not None:
                self._waiting.discard(self._discard)
                self._waiting = None
            self._gen.close()
            self._finish(error=Cancelled(f"{self.what or 'task'} cancelled"))
            return False
        send, throw = None, None
        if self._waiting is not None:
            if not self._waiting.done:
                return True
            send, throw = self._waiting.result, self._waiting.error
            self._waiting = None
        t0 = time.perf_counter()
        try:
            out = self._gen.throw(throw) if throw is not None else self._gen.send(send)
        except StopIteration as stop:
            self._finish(result=stop.value)
        except BaseException as e:
            self._finish(error=e)
        else:
            if isinstance(out, Background):
                self._waiting = out
            elif isinstance(out, str):
                self.message = out
        finally:
            elapsed = time.perf_counter() - t0
            self.slices += 1
            self.longest_slice = max(self.longest_slice, elapsed)
        return not self.finished

    def _finish(self, result=None, error: Optional[BaseException] = None) -> None:
        self.finished, self.result, self.error = True, result, error

    def take(self):
        """The result; raises the task's error. Only once finished."""
        if not self.finished:
            raise RuntimeError(f"{self.what or 'task'} has not finished")
        if self.error is not None:
            raise self.error
        return self.result

    def run(self):
        """Runs to the end in this thread (joining helper threads) and returns the result."""
        while self.step():
            if self._waiting is not None:
                self._waiting.join()
        return self.take()


def run(generator: Generator, what: str = ""):
    """Runs a task's generator to its end now: the one-shot form of an incremental operation."""
    return Task(generator, what).run()


def in_background(function: Callable[[], object], what: str = "", name: str = "sfr-background", cancellable: bool = True,
                  discard: Optional[Callable[[object], None]] = None) -> Task:
    """A task whose only work is ``function()`` on a helper thread (file copies, model saves):
    its GUI-thread slices only start the thread and hand over the result. ``cancellable`` and
    ``discard`` as for Task."""

    def gen():
        return (yield Background(function, name=name))

    return Task(gen(), what, cancellable=cancellable, discard=discard)
