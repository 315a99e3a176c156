"""``SFRLogic``: chooses where jobs run, finds the library or the tool, caches loaded models.

Two execution modes, with the same job interface (jobs.py):

``worker`` (the default): each job runs the ``sfr`` tool in a child process (worker.py).
    Nothing of libsfr or libtorch is loaded into this process.
``in-process`` (opt-in): libsfr is loaded into this process through ctypes (native.py).
    Faster, no temporary files, but inside Slicer it is a risk for the whole session:
    libtorch_cpu.so / libc10.so carry SONAMEs, and the dynamic loader reuses a library whose
    SONAME is already loaded. Once libsfr brought libtorch 2.13 in, a later ``import torch``
    by another extension (TotalSegmentator, SlicerPyTorch, MONAI Label) binds to our copy of
    another version; and if PyTorch was imported first, libsfr binds to *its* libtorch. This is
    why SlicerNNUNet and TotalSegmentator run their work in a separate process too.

Nothing here loads libsfr or runs the tool until a job starts or ``check()`` is called, so a
GUI can create an SFRLogic when its panel opens at no cost and without risk.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Callable, Dict, Optional, Union

from . import worker
from .binding import Library, LibraryLoadError, find_library_path, load_library
from .inputs import (
    NATIVE_TRAINING_BYTES_PER_VOXEL,
    InputError,
    TrainingData,
    build_config,
    check_memory,
    training_memory_bytes,
)
from .jobs import DeferredJob, Job, Model, Reporter
from .native import NativeModel, NativeTrainingJob

MODES = ("worker", "in-process")
# Settings saved by earlier versions of the module: "auto" loaded libsfr in-process whenever
# torch was not imported yet, which is exactly the risk described above.
LEGACY_MODES = {"auto": "worker"}
METHODS = ("mean-teacher", "supervised", "self-training", "acmt")
PRESETS = ("cpu-small", "cpu-lora", "paper-la", "test-tiny")
# What each preset is and how long it takes, as measured (docs/results.md, README): shown next to
# the preset selector.
PRESET_LABELS = {
    "cpu-small": "CPU, small",
    "cpu-lora": "CPU, LoRA-tuned SAM (better pseudo-labels)",
    "paper-la": "Paper settings (GPU)",
    "test-tiny": "Smoke test (not accurate)",
}
# Presets whose SAM is LiteMedSAM from the cache (sam.variant "auto"); paper-la's is ViT-B
# (needs the official checkpoint); test-tiny's a test-sized SAM that is never pretrained.
LITE_MEDSAM_PRESETS = ("cpu-small", "cpu-lora")


def default_preset(bf16: Optional[bool] = None) -> str:
    """The preset the panel starts with, chosen by what this CPU can do. The one place that
    decides it. ``bf16``: whether the CPU has AVX512-BF16 (None: read it from this machine).

    * AVX512-BF16: ``cpu-lora`` — its LoRA SAM stage runs in bfloat16 (about 7 minutes in all),
      and its pseudo-labels were 13 points of Dice better than ``cpu-small``'s;
    * otherwise: ``cpu-small`` — minutes on any 2-core CPU, where ``cpu-lora``'s float32 SAM
      stage takes a quarter of an hour or more. Its SFR rows have not shown a gain over
      supervised training (docs/results.md): the panel's time line says so."""
    if bf16 is None:
        bf16 = cpu_has_avx512_bf16()
    return "cpu-lora" if bf16 else "cpu-small"


def cpu_has_avx512_bf16() -> Optional[bool]:
    """Whether this CPU computes bfloat16 in hardware (Linux /proc/cpuinfo; None elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split()
    except OSError:
        return None
    return None


def preset_expected_time(preset: str) -> str:
    """The preset's training time on this machine, as far as measurements say."""
    import os

    cores = os.cpu_count() or 0
    if preset == "cpu-small":
        return (f"Minutes on a CPU (measured on 2 cores; this machine has {cores}). Its SFR has not shown "
                "a gain over supervised training; with one labelled case it scored below it.")
    if preset == "cpu-lora":
        bf16 = cpu_has_avx512_bf16()
        if bf16:
            return f"About 7 minutes on a CPU with AVX512-BF16, as this one has ({cores} cores here)."
        return (f"About 15 minutes measured on 2 cores without AVX512-BF16 (this machine: {cores} cores"
                + (", no AVX512-BF16)." if bf16 is False else ")."))
    if preset == "paper-la":
        return "Hours; meant for a GPU."
    if preset == "test-tiny":
        return "Seconds; only shows that everything works."
    return ""


def sam_weights_warning(preset: Optional[str], use_sam: bool, sam_checkpoint: Optional[str], env: Optional[Dict[str, str]] = None,
                        lite_medsam_ok: Optional[bool] = None) -> Optional[str]:
    """The warning to give *before* training when SAM would start from random weights (None
    when it would not). ``lite_medsam_ok``: the cache's state when already known (else it is
    read: 37 MB, off the GUI thread)."""
    import os

    from . import download

    if not use_sam or sam_checkpoint or preset == "test-tiny":
        return None
    env = os.environ if env is None else env
    if env.get("SFR_SAM_CHECKPOINT"):
        return None  # the tool takes the checkpoint the environment names
    if preset in LITE_MEDSAM_PRESETS:
        ok = download.lite_medsam_state(env)["ok"] if lite_medsam_ok is None else lite_medsam_ok
        if ok:
            return None
        return ("LiteMedSAM's weights are not in the cache, so SAM would start from RANDOM weights and its pseudo-labels "
                "would be far weaker. Fetch them in Setup (Fetch LiteMedSAM) first, or give a SAM checkpoint.")
    return (f"No SAM checkpoint is given, so the '{preset}' preset's SAM (ViT-B) would start from RANDOM weights. "
            "Download the official SAM ViT-B checkpoint first, or untick SAM pseudo-labels.")

IN_PROCESS_RISK = (
    "libsfr and its libtorch 2.13 are loaded into Slicer's process: an extension that imports "
    "PyTorch later in this session (TotalSegmentator, SlicerPyTorch, MONAI Label, ...) would bind "
    "to this libtorch, and one that imported it before makes libsfr bind to its own. Use the "
    "worker process unless no other PyTorch-based extension is used in the session."
)


def torch_already_loaded() -> bool:
    """True when this Python has imported PyTorch (another extension did ``import torch``)."""
    return "torch" in sys.modules


class SFRLogic:
    """``library_path``: libsfr (the module's setting), else ``$SFR_LIBRARY``, else next to the
    module; a path that is given but points nowhere is an error, never a fallback to another
    copy. ``cli_path``: the ``sfr`` tool for worker mode (else ``$SFR_CLI``, next to the library,
    next to the module, PATH). ``device``: "cpu", "cuda" or "auto" for models; None leaves it to
    the library. ``env``: the environment of worker processes (inside Slicer:
    ``slicer.util.startupEnvironment()``); None = this process's."""

    def __init__(self, library_path: Optional[str] = None, mode: str = "worker", cli_path: Optional[str] = None,
                 device: Optional[str] = None, work_root: Optional[str] = None, env: Optional[Dict[str, str]] = None):
        mode = LEGACY_MODES.get(mode, mode)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.library_path = library_path or None
        self.cli_path = cli_path or None
        self.mode = mode
        self.device = device
        self.work_root = work_root
        self.env = env
        # Helper threads load models and check the tool: one lock for the caches.
        self._lock = threading.RLock()
        self._library: Optional[Library] = None
        self._cli: Optional[Path] = None
        self._cli_version: Optional[str] = None
        self._models: Dict[str, Model] = {}

    # -- what runs the jobs ----------------------------------------------------------------
    @property
    def library(self) -> Library:
        """The loaded libsfr (loads it on first use: in-process mode only)."""
        with self._lock:
            if self._library is None:
                if self.mode != "in-process":
                    raise RuntimeError("libsfr is only loaded in 'in-process' mode")
                self._library = load_library(self.library_path)
            return self._library

    @property
    def cli(self) -> Path:
        """The ``sfr`` tool's path (found by file checks only; no process runs)."""
        with self._lock:
            if self._cli is None:
                self._cli = worker.find_cli(self.cli_path, self.library_path)
            return self._cli

    def check_cli(self) -> str:
        """Runs ``sfr --version`` once (seconds at most; call it off the GUI thread). The lock
        is not held while the process runs: the GUI thread takes it (``cli``, ``describe``)
        and must never wait for a process."""
        with self._lock:
            if self._cli_version is not None:
                return self._cli_version
            cli = self.cli
        version = worker.cli_version(cli, self.env)
        with self._lock:
            self._cli_version = version
        return version

    def describe(self) -> dict:
        """Where jobs will run, without loading anything or running a process:
        {"mode", "path", "version" (None until checked or loaded)}. Raises LibraryLoadError /
        CliNotFoundError when the file is missing."""
        if self.mode == "in-process":
            with self._lock:
                if self._library is not None:
                    return {"mode": self.mode, "path": str(self._library.path), "version": self._library.version}
            return {"mode": self.mode, "path": str(find_library_path(self.library_path)), "version": None}
        cli = self.cli
        return {"mode": self.mode, "path": str(cli), "version": self._cli_version}

    def check(self) -> dict:
        """``describe()`` after really checking: loads libsfr (in-process) or runs
        ``sfr --version`` (worker). Blocks for up to seconds: for a helper thread or a test."""
        if self.mode == "in-process":
            lib = self.library
            return {"mode": self.mode, "path": str(lib.path), "version": lib.version}
        version = self.check_cli()
        return {"mode": self.mode, "path": str(self.cli), "version": version}

    # -- training --------------------------------------------------------------------------
    def start_training(self, data: Union[TrainingData, Callable[[Reporter], TrainingData]], config: Optional[dict] = None,
                       preset: Optional[str] = None, method: Optional[str] = None, sam_checkpoint: Optional[str] = None,
                       use_sam: Optional[bool] = None, device: Optional[str] = None,
                       on_progress: Optional[Callable[[dict], None]] = None, normalization: Optional[str] = None) -> Job:
        """Starts training and returns at once with a job whose ``wait()`` gives the Model.

        ``data``: a TrainingData, or a function ``(reporter) -> TrainingData`` that is called on
        a helper thread (so that building and checking big arrays does not block a GUI).
        ``on_progress`` (in-process only) is called from the library's thread: do not touch a
        GUI from it; poll instead."""
        cfg = build_config(config, preset, method, sam_checkpoint, use_sam, device, normalization)
        if isinstance(data, worker.DecathlonWriter):
            if self.mode != "worker":
                raise ValueError("cases written for the worker process cannot train in-process")
            data.check_ready()
            return worker.WorkerTrainingJob(self.cli, data, cfg, self.work_root, self.env, self.check_cli)
        if isinstance(data, TrainingData):
            data.check_ready()
        if self.mode == "worker" and on_progress is not None:
            raise ValueError("on_progress is not available in worker mode: poll the job")

        def build(reporter: Reporter) -> TrainingData:
            d = data if isinstance(data, TrainingData) else data(reporter)
            d.check_ready()
            return d

        if self.mode == "worker":
            if isinstance(data, TrainingData):
                return worker.WorkerTrainingJob(self.cli, data, cfg, self.work_root, self.env, self.check_cli)
            cli = self.cli
            return DeferredJob(lambda r: worker.WorkerTrainingJob(cli, build(r), cfg, self.work_root, self.env, self.check_cli))

        def start_native(reporter: Reporter) -> Job:
            d = build(reporter)
            check_memory(
                training_memory_bytes(d, NATIVE_TRAINING_BYTES_PER_VOXEL),
                f"training on {sum(d.counts())} volumes in this process",
                "use the worker process mode (it needs no memory in Slicer's process), or fewer or smaller volumes",
            )
            reporter.report("copying the cases into libsfr")
            return NativeTrainingJob(self.library, d, cfg, on_progress)

        return DeferredJob(start_native)

    def training_sink(self, classes):
        """Where gathered training cases go, one at a time (scene.TrainingCollector's sink):
        worker mode writes each case to a file in this logic's work folder as it arrives
        (bounded memory); in-process mode keeps them (libsfr copies them when training starts)."""
        if self.mode == "worker":
            return worker.DecathlonWriter(classes, self.work_root)
        return TrainingData(classes)

    # -- models ----------------------------------------------------------------------------
    def load_model(self, path) -> Model:
        """Opens a model file (not cached). In-process: loads it into libsfr (up to seconds)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise InputError(f"model file {path} does not exist")
        if self.mode == "in-process":
            return NativeModel.load_file(self.library, path, self.device)
        return worker.WorkerModel(self.cli, path, device=self.device, work_root=self.work_root, env=self.env, before=self.check_cli)

    def model(self, path) -> Model:
        """A model cached by path (loading costs a second or two). Thread-safe."""
        key = str(Path(path).expanduser())
        with self._lock:
            if key not in self._models:
                self._models[key] = self.load_model(key)
            return self._models[key]

    def forget_model(self, path) -> None:
        with self._lock:
            model = self._models.pop(str(Path(path).expanduser()), None)
        if model is not None:
            model.close()

    def start_segmentation(self, model_path, array, ijk_to_ras) -> Job:
        """Loads the model (cached) and starts segmenting, all on a helper thread; returns at
        once. ``wait()`` gives the labels, ``[k, j, i]`` on the image's grid."""

        def start(reporter: Reporter) -> Job:
            reporter.report("loading the model")
            model = self.model(model_path)
            reporter.report("starting the segmentation")
            return model.start_segmentation(array, ijk_to_ras)

        return DeferredJob(start, name="sfr-segment-prepare")

    def close(self) -> None:
        with self._lock:
            models, self._models = list(self._models.values()), {}
        for m in models:
            m.close()


__all__ = ["MODES", "LEGACY_MODES", "METHODS", "PRESETS", "PRESET_LABELS", "default_preset", "preset_expected_time",
           "sam_weights_warning", "IN_PROCESS_RISK", "SFRLogic", "torch_already_loaded", "LibraryLoadError"]
