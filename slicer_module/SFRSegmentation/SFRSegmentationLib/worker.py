"""Worker-process mode (the default inside Slicer): the same jobs run by the ``sfr``
command-line tool in a child process, exchanging NIfTI files through a temporary folder.

Why: libsfr links libtorch 2.13, and libtorch_cpu.so / libc10.so carry SONAMEs that the dynamic
loader reuses once loaded. Loading libsfr into a Python that hosts other PyTorch users (Slicer
extensions) makes whichever comes second bind to the first one's libtorch: symbol clashes,
crashes at load time or mid-training, for them or for us. A child process has its own address
space, so nothing clashes; it is started with the environment the host gives (inside Slicer,
Slicer's startup environment, without the launcher's library paths). Progress arrives as JSON
lines (``--progress json``); cancellation is an interrupt (the tool's Ctrl-C path, which writes
no half-finished file), followed by a kill if the process has not ended within a few seconds.
Each job runs on its own helper thread (writing the inputs, running the tool, reading the
result), so none of that happens on the thread that started it.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import modelfile, nifti
from .binding import Cancelled, SfrError, installed_engine, library_file_name, module_dir, parse_version, version_is_compatible
from .inputs import InputError, TrainingData, _check_image, _check_matrix
from .jobs import Job, Model, progress

MODEL_SUFFIX = ".sfrmodel"

CLI_ENV_VAR = "SFR_CLI"
CANCEL_GRACE_SECONDS = 5.0


class CliNotFoundError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# The worker ends when Slicer ends.
#
# A worker that outlives Slicer (a crash, a kill, a closed terminal) keeps a CPU busy for hours
# and holds its temporary folder. On Linux the kernel ends it: the child asks for SIGKILL when
# its parent dies (prctl PR_SET_PDEATHSIG, set between fork and exec). The kernel sends it when
# the *thread* that started the child ends; here that is the job's helper thread, which waits
# for the child until it has ended, so it never ends first. Elsewhere (macOS, Windows) there is
# no such call: an atexit handler kills the workers when Slicer's Python exits normally, but a
# crash of Slicer leaves the worker to finish its job alone (the panel says so).
PR_SET_PDEATHSIG = 1
_LIVE: "weakref.WeakSet" = weakref.WeakSet()


def _resolve_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        f = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    f.restype = ctypes.c_int
    return f


# Resolved once, before any fork: the child may only call it, not load anything.
_PRCTL = _resolve_prctl()
DIES_WITH_PARENT = _PRCTL is not None


def _die_with_parent(parent_pid: int):
    def preexec() -> None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent died between fork and prctl: end now, as it would have asked

    return preexec


@atexit.register
def _kill_live_workers() -> None:
    # Daemon threads (and the cancel timer) do not run at interpreter exit: kill what is left.
    for w in list(_LIVE):
        try:
            if w.proc.poll() is None:
                w.proc.kill()
        except Exception:
            pass


OWNER_FILE = "owner.pid"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_folders(root, prefixes=("sfr-train-", "sfr-segment-", "sfr-model-")) -> List[Path]:
    """Removes job folders under ``root`` whose owner (the Slicer that made them) is no longer
    running: what a crash or a kill left behind. Returns what was removed."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for d in root.iterdir():
        if not d.is_dir() or not d.name.startswith(prefixes):
            continue
        try:
            pid = int((d / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue  # not ours to judge (no owner file)
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def cli_file_name() -> str:
    return "sfr.exe" if sys.platform.startswith("win") else "sfr"


def find_cli(explicit: Optional[str] = None, library_path: Optional[str] = None) -> Path:
    """The ``sfr`` executable: explicit path > ``$SFR_CLI`` > next to the library > the module's
    ``lib``/``bin`` folders > the installed ``sfr-segmentation`` package > the crate's
    ``target/release`` > ``PATH``."""
    name = cli_file_name()
    candidates: List[Tuple[str, Path]] = []
    if explicit:
        candidates.append(("setting", Path(explicit).expanduser()))
    if os.environ.get(CLI_ENV_VAR):
        candidates.append((f"${CLI_ENV_VAR}", Path(os.environ[CLI_ENV_VAR]).expanduser()))
    for lib in (library_path, os.environ.get("SFR_LIBRARY")):
        if lib:
            p = Path(lib).expanduser()
            candidates.append(("next to the library", (p if p.is_dir() else p.parent) / name))
    here = module_dir()
    candidates += [
        ("next to the module", here / "lib" / name),
        ("next to the module", here / "bin" / name),
    ]
    engine = installed_engine()
    if engine is not None:
        candidates.append(("installed sfr-segmentation package", engine["cli"]))
    candidates += [
        ("source checkout", here.parent.parent / "target" / "release" / name),
    ]
    on_path = shutil.which(name)
    if on_path:
        candidates.append(("PATH", Path(on_path)))
    tried = []
    for origin, p in candidates:
        if p.is_dir():
            p = p / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
        tried.append(f"  - {p} ({origin}): {'not executable' if p.is_file() else 'not found'}")
        if origin in ("setting", f"${CLI_ENV_VAR}"):
            # A path that was given and points nowhere is an error, never a silent fallback.
            raise CliNotFoundError(
                f"the sfr tool path set {'in the module' if origin == 'setting' else 'in ' + CLI_ENV_VAR} "
                f"is not usable: {p} {'is not executable' if p.is_file() else 'does not exist'}. Correct or clear it "
                "(no other copy is used in its place).\nTried:\n" + "\n".join(tried)
            )
    raise CliNotFoundError(
        f"the sfr command-line tool ({name}) was not found; worker mode needs it. Set its path, set "
        f"{CLI_ENV_VAR}, or place it next to {library_file_name()}.\nTried:\n" + "\n".join(tried)
    )


def cli_version(cli: Path, env: Optional[Dict[str, str]] = None) -> str:
    """``sfr --version`` -> "0.1.0"; raises when the tool does not run or is incompatible.
    Runs a process (up to seconds): call it from a helper thread in a GUI."""
    try:
        out = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CliNotFoundError(f"{cli} does not run: {e}") from e
    if out.returncode != 0:
        raise CliNotFoundError(f"{cli} --version failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
    version = out.stdout.strip().split()[-1] if out.stdout.strip() else ""
    if not version_is_compatible(parse_version(version)):
        raise CliNotFoundError(f"{cli} is version {version}, which this module does not support")
    return version


class WorkerProcess:
    """A running ``sfr`` command: progress from its JSON lines, log from stderr (kept in a
    file, so a chatty process can never block on a full pipe)."""

    def __init__(self, argv: List[str], folder: Path, env: Optional[Dict[str, str]] = None):
        self.argv = argv
        self.folder = Path(folder)
        self.stderr_path = self.folder / "worker.log"
        self._stderr = open(self.stderr_path, "wb")
        self._lock = threading.Lock()
        self._progress = {
            "stage": "starting",
            "step": 0,
            "total": 0,
            "loss": None,
            "eta_seconds": None,
            "message": "starting the worker process",
            "finished": False,
        }
        self.lines: deque = deque(maxlen=2000)
        self.cancel_requested = False
        kwargs = {}
        if sys.platform.startswith("win"):
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        if DIES_WITH_PARENT:
            kwargs["preexec_fn"] = _die_with_parent(os.getpid())
        try:
            # env: inside Slicer, the environment Slicer was started with
            # (slicer.util.startupEnvironment(), as slicer.util.launchConsoleProcess uses), so
            # the launcher's LD_LIBRARY_PATH/PYTHONPATH/PYTHONHOME (Slicer's libraries, possibly
            # another extension's libtorch) do not leak into the tool. None: this process's.
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL, cwd=str(self.folder),
                env=env, **kwargs
            )
        except OSError as e:
            self._stderr.close()
            raise SfrError("SFR_WORKER_FAILED", f"cannot start {argv[0]}: {e}") from e
        _LIVE.add(self)
        self._reader = threading.Thread(target=self._read_stdout, name="sfr-worker-reader", daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                self.lines.append(line)
                continue
            if isinstance(event, dict):
                with self._lock:
                    for key in ("stage", "step", "total", "loss", "eta_seconds", "message"):
                        if key in event:
                            self._progress[key] = event[key]
        self.proc.stdout.close()

    def poll(self) -> dict:
        with self._lock:
            p = dict(self._progress)
        rc = self.proc.poll()
        # "finished" means the process has ended, not merely that the tool said so: only then
        # are its output files complete.
        p["finished"] = rc is not None
        if rc is not None and rc != 0 and not self.cancel_requested:
            p["message"] = self.error_text() or p["message"]
        return p

    def cancel(self) -> None:
        if self.cancel_requested or self.proc.poll() is not None:
            self.cancel_requested = True
            return
        self.cancel_requested = True
        try:
            if sys.platform.startswith("win"):
                self.proc.terminate()
            else:
                self.proc.send_signal(signal.SIGINT)
        except OSError:
            return
        timer = threading.Timer(CANCEL_GRACE_SECONDS, self._kill_if_running)
        timer.daemon = True
        timer.start()

    def _kill_if_running(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass

    def log_tail(self, n: int = 40) -> str:
        try:
            text = self.stderr_path.read_text("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-n:])

    def warnings(self) -> List[str]:
        """The tool's warnings (env_logger's "[WARN ...] text" lines, e.g. SAM starting from
        random weights), read from its log before the job's folder is removed."""
        try:
            text = self.stderr_path.read_text("utf-8", "replace")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            if line.startswith("[WARN"):
                out.append(line.split("]", 1)[1].strip() if "]" in line else line)
        return out

    def error_text(self) -> str:
        lines = self.log_tail(200).splitlines()
        errors = [l for l in lines if l.startswith("error:")]
        if errors:
            return errors[-1][len("error:") :].strip()
        return "\n".join(lines[-10:])

    def wait(self, timeout: Optional[float] = None) -> None:
        """Blocks until the process ends; raises Cancelled or SfrError on failure."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the worker process is still running after {timeout} s")
        self._reader.join(5)
        if not self._stderr.closed:
            self._stderr.close()
        if self.cancel_requested or rc == 130:
            raise Cancelled("the worker process was cancelled", self.argv[1] if len(self.argv) > 1 else "")
        if rc != 0:
            raise SfrError(
                "SFR_WORKER_FAILED",
                f"{' '.join(self.argv[:2])} exited with status {rc}: {self.error_text()}",
            )

    def close(self) -> None:
        if self.proc.poll() is None:
            self._kill_if_running()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if not self._stderr.closed:
            self._stderr.close()


def write_decathlon(folder: Path, data, dataset_name: str = "slicer", report: Optional[Callable[[str, int, int], None]] = None) -> int:
    """Writes a TrainingData as a Decathlon folder (labelled cases first) -> number labelled.
    ``report(message, step, total)`` is called before each case (and may raise to stop)."""
    folder = Path(folder)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    cases = data.labeled + data.unlabeled
    for n, case in enumerate(cases):
        if report is not None:
            report(f"writing case {n + 1}/{len(cases)} for the worker process", n, len(cases))
        # Ids keep the given order: the tool takes "the first N" as the labelled ones.
        stem = f"{n:04d}_{_safe(case.case_id)}"
        nifti.write(folder / "imagesTr" / f"{stem}.nii", case.image, case.ijk_to_ras)
        entry = {"image": f"./imagesTr/{stem}.nii"}
        if case.label is not None:
            nifti.write(folder / "labelsTr" / f"{stem}.nii", data.label_array(case), case.ijk_to_ras)
            entry["label"] = f"./labelsTr/{stem}.nii"
        training.append(entry)
    doc = {
        "name": dataset_name,
        "labels": {str(k): v for k, v in sorted(data.classes.items())},
        "training": training,
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(doc, indent=1))
    return len(data.labeled)


class DecathlonWriter:
    """Training cases written into a Decathlon folder one at a time, as they arrive (the sink
    of scene.TrainingCollector in worker mode): each case is checked (as TrainingData checks
    it), written as NIfTI, and let go, so the memory the module holds stays that of one case
    however many cases there are. ``WorkerTrainingJob`` then trains on the folder and owns it.
    ``close()`` removes the folder (a cancelled or failed gathering)."""

    holds_all = False

    def __init__(self, classes, work_root: Optional[str] = None):
        self._spec = TrainingData(classes)  # the class list and the checks; keeps no case
        self.classes = self._spec.classes
        self.dir = make_temp_dir("sfr-train-", work_root)
        self.data_dir = self.dir / "data"
        (self.data_dir / "imagesTr").mkdir(parents=True)
        (self.data_dir / "labelsTr").mkdir()
        self._labeled: List[dict] = []
        self._unlabeled: List[dict] = []
        self.handed_over = False
        self.closed = False

    def _writing(self):
        if self.closed:
            raise Cancelled("the training data was cancelled while it was being written")

    def _written(self) -> None:
        # Closed while this case was written (on a helper thread): remove what it added.
        if self.closed:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise Cancelled("the training data was cancelled while it was being written")

    def add_labeled(self, image, label, ijk_to_ras, label_ijk_to_ras=None, case_id: Optional[str] = None) -> str:
        self._writing()
        case = self._spec.check_labeled(image, label, ijk_to_ras, label_ijk_to_ras, case_id)
        stem = f"L{len(self._labeled):04d}_{_safe(case.case_id)}"
        nifti.write(self.data_dir / "imagesTr" / f"{stem}.nii", case.image, case.ijk_to_ras)
        nifti.write(self.data_dir / "labelsTr" / f"{stem}.nii", np.ascontiguousarray(case.label, dtype=self._spec.label_dtype()), case.ijk_to_ras)
        self._written()
        self._labeled.append({"image": f"./imagesTr/{stem}.nii", "label": f"./labelsTr/{stem}.nii"})
        return case.case_id

    def add_unlabeled(self, image, ijk_to_ras, case_id: Optional[str] = None) -> str:
        self._writing()
        case = self._spec.check_unlabeled(image, ijk_to_ras, case_id)
        stem = f"U{len(self._unlabeled):04d}_{_safe(case.case_id)}"
        nifti.write(self.data_dir / "imagesTr" / f"{stem}.nii", case.image, case.ijk_to_ras)
        self._written()
        self._unlabeled.append({"image": f"./imagesTr/{stem}.nii"})
        return case.case_id

    def counts(self) -> tuple:
        return len(self._labeled), len(self._unlabeled)

    def check_ready(self) -> None:
        if not self._labeled:
            raise InputError("no labelled case: add at least one image with its segmentation")

    def finish(self, dataset_name: str = "slicer") -> int:
        """Writes dataset.json (labelled cases first: the tool takes "the first N" as the
        labelled ones) -> the number labelled."""
        self.check_ready()
        doc = {"name": dataset_name, "labels": {str(k): v for k, v in sorted(self.classes.items())},
               "training": self._labeled + self._unlabeled, "test": []}
        (self.data_dir / "dataset.json").write_text(json.dumps(doc, indent=1))
        return len(self._labeled)

    def close(self) -> None:
        if not self.handed_over:
            self.closed = True
            shutil.rmtree(self.dir, ignore_errors=True)


def _safe(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_" else "_" for c in text)
    return out[:60] or "case"


def train_argv(cli: Path, data_dir: Path, n_labeled: int, out: Path, user_config: dict) -> List[str]:
    """The ``sfr train`` command for a user config: a full config (it has "version") goes in a
    file; ``{"preset": NAME, ...}`` becomes ``--preset NAME --set {...}``."""
    # --allow-weak: a model whose training check failed comes back like any other; the panel
    # reads the check from its metadata and shows it in red before the model is used.
    argv = [str(cli), "train", "--data", str(data_dir), "--labeled", str(n_labeled), "--out", str(out), "--progress", "json", "--allow-weak"]
    cfg = dict(user_config)
    if "version" in cfg:
        path = data_dir / "config.json"
        path.write_text(json.dumps(cfg))
        argv += ["--config", str(path)]
    else:
        argv += ["--preset", str(cfg.pop("preset", "cpu-small"))]
        if cfg:
            argv += ["--set", json.dumps(cfg)]
    return argv


def read_segmentation(path: Path, expected_shape, ijk_to_ras) -> np.ndarray:
    labels, m = nifti.read(path)
    if labels.shape != tuple(expected_shape):
        raise SfrError("SFR_WORKER_FAILED", f"{path}: segmentation shape {labels.shape} differs from the image's {tuple(expected_shape)}")
    # NIfTI stores the matrix as float32: compare with a tolerance fit for that.
    if not np.allclose(m, np.asarray(ijk_to_ras, dtype=float), rtol=1e-5, atol=1e-3):
        raise SfrError("SFR_WORKER_FAILED", f"{path}: the segmentation's geometry differs from the image's (this is a bug)")
    return labels


def make_temp_dir(prefix: str, root: Optional[str] = None) -> Path:
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    # Who made it: remove_stale_folders deletes it once that process is gone.
    (d / OWNER_FILE).write_text(str(os.getpid()))
    return d


# ---------------------------------------------------------------------------------------------
# Jobs and models through the tool


class _WorkerJob(Job):
    """The whole job runs on a helper thread: write the inputs (NIfTI) -> run the tool -> read
    its outputs. Neither the file writes nor the reading of the result happen on the thread that
    started the job (Slicer's GUI thread). ``before`` (e.g. the ``sfr --version`` check) runs
    first on that thread."""

    def __init__(self, prefix: str, work_root: Optional[str], env: Optional[Dict[str, str]], before: Optional[Callable[[], None]],
                 folder: Optional[Path] = None):
        self._dir = Path(folder) if folder is not None else make_temp_dir(prefix, work_root)
        self._env = env
        self._before = before
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._proc: Optional[WorkerProcess] = None
        self._prep = progress("prepare", "preparing the worker process")
        self._result = None
        self._error: Optional[BaseException] = None
        self._taken = False
        self.warnings: List[str] = []  # the tool's warnings, once its process has ended
        self._thread = threading.Thread(target=self._run, name="sfr-worker-job", daemon=True)

    # Subclasses: write the inputs and return the command; collect the result.
    def _prepare(self) -> List[str]:
        raise NotImplementedError

    def _collect(self):
        raise NotImplementedError

    def _report(self, message: str, step: int = 0, total: int = 0) -> None:
        with self._lock:
            self._prep = progress("prepare", message, step, total)
        if self._cancel.is_set():
            raise Cancelled("cancelled while preparing the worker process")

    def _run(self) -> None:
        try:
            if self._before is not None:
                self._report("checking the sfr tool")
                self._before()
            argv = self._prepare()
            with self._lock:
                if self._cancel.is_set():
                    raise Cancelled("cancelled while preparing the worker process")
                self._proc = WorkerProcess(argv, self._dir, self._env)
            try:
                self._proc.wait()
            finally:
                # Its log goes with the folder: keep the warnings for whoever takes the result.
                self.warnings = self._proc.warnings()
            self._report("reading the result")
            self._result = self._collect()
        except BaseException as e:  # kept for wait(): nothing is lost in the thread
            self._error = e
        finally:
            if self._proc is not None:
                self._proc.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    def poll(self) -> dict:
        with self._lock:
            proc, p = self._proc, dict(self._prep)
        if proc is not None:
            p = proc.poll()
        # Finished only once the thread is done: the result has then been read (or failed).
        p["finished"] = not self._thread.is_alive()
        if p["finished"] and self._error is not None and not isinstance(self._error, Cancelled):
            p["message"] = str(self._error)
        return p

    def cancel(self) -> None:
        with self._lock:
            self._cancel.set()
            proc = self._proc
        if proc is not None:
            proc.cancel()

    def log_tail(self, n: int = 40) -> str:
        return self._proc.log_tail(n) if self._proc is not None else ""

    def wait(self, timeout: Optional[float] = None):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the worker job is still running after {timeout} s")
        if self._taken:
            raise SfrError("SFR_ERR_STATE", "the job's result was already taken")
        self._taken = True
        if self._error is not None:
            raise self._error
        return self._result

    def close(self) -> None:
        # Never blocks: a running job is cancelled; its thread removes the folder when it ends.
        if getattr(self, "_thread", None) is not None and self._thread.is_alive():
            self.cancel()


class WorkerTrainingJob(_WorkerJob):
    """``data``: a TrainingData (written to files on the job's thread) or a DecathlonWriter
    whose cases are already on disk (the job takes its folder over)."""

    def __init__(self, cli: Path, data, config: dict, work_root: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, before: Optional[Callable[[], None]] = None):
        written = isinstance(data, DecathlonWriter)
        if written:
            data.handed_over = True
        super().__init__("sfr-train-", work_root, env, before, folder=data.dir if written else None)
        self._cli, self._data, self._config, self._work_root = Path(cli), data, config, work_root
        self._out = self._dir / "out" / ("model" + MODEL_SUFFIX)
        self._thread.start()

    def _prepare(self) -> List[str]:
        if isinstance(self._data, DecathlonWriter):
            n_labeled = self._data.finish()
        else:
            n_labeled = write_decathlon(self._dir / "data", self._data, report=self._report)
        self._data = None  # the arrays are on disk now: let Python free them
        self._out.parent.mkdir()
        return train_argv(self._cli, self._dir / "data", n_labeled, self._out, self._config)

    def _collect(self) -> "WorkerModel":
        # The model outlives this job's folder: move it into a folder of its own.
        model_dir = make_temp_dir("sfr-model-", str(self._dir.parent))
        target = model_dir / self._out.name
        shutil.move(str(self._out), str(target))
        return WorkerModel(self._cli, target, owned_dir=model_dir, work_root=self._work_root, env=self._env)


class WorkerSegmentationJob(_WorkerJob):
    def __init__(self, model: "WorkerModel", array: np.ndarray, ijk_to_ras, device: Optional[str] = None,
                 work_root: Optional[str] = None, env: Optional[Dict[str, str]] = None, before: Optional[Callable[[], None]] = None):
        a = _check_image("image to segment", array)
        m = _check_matrix("image to segment, geometry", ijk_to_ras)
        super().__init__("sfr-segment-", work_root, env, before)
        self._model, self._array, self._matrix, self._device = model, a, m, device
        self._shape = a.shape
        self._thread.start()

    def _prepare(self) -> List[str]:
        self._report("writing the image for the worker process")
        nifti.write(self._dir / "image.nii", self._array, self._matrix)
        self._array = None
        argv = [str(self._model.cli), "segment", "--model", str(self._model.path), "--input", str(self._dir / "image.nii"),
                "--output", str(self._dir / "labels.nii"), "--progress", "json"]
        if self._device:
            argv += ["--device", self._device]
        return argv

    def _collect(self) -> np.ndarray:
        labels = read_segmentation(self._dir / "labels.nii", self._shape, self._matrix)
        dt, _ = self._model.label_dtype()
        return np.ascontiguousarray(labels, dtype=dt)


class WorkerModel(Model):
    """A model file used through the ``sfr`` tool. ``owned_dir``: a temporary folder holding a
    freshly trained model, removed when the model is closed (save it first)."""

    def __init__(self, cli: Path, path, owned_dir: Optional[Path] = None, device: Optional[str] = None,
                 work_root: Optional[str] = None, env: Optional[Dict[str, str]] = None, before: Optional[Callable[[], None]] = None):
        self.cli = Path(cli)
        self.path = Path(path)
        self._owned_dir = owned_dir
        self._device = device
        self._work_root = work_root
        self._env = env
        self._before = before
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
        return WorkerSegmentationJob(self, array, ijk_to_ras, self._device, self._work_root, self._env, self._before)

    def close(self) -> None:
        d = getattr(self, "_owned_dir", None)
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
            self._owned_dir = None
