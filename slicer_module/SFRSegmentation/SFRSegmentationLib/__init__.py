"""SFRSegmentationLib: the logic of the 3D Slicer module SFRSegmentation, as plain Python +
numpy (+ ctypes over libsfr in in-process mode). Importing it imports nothing of Slicer, VTK or
Qt, and loads no library, so it runs (and is tested) in any Python.

    inputs.py     TrainingData: arrays + IJK-to-RAS matrices, checked; config; memory check
    jobs.py       the Job / Model interfaces, DeferredJob (preparation on a helper thread)
    native.py     in-process jobs and models over libsfr (ctypes; opt-in inside Slicer)
    worker.py     the same through the ``sfr`` tool in a child process (the default)
    registry.py   the model folder (and the classes' terminology beside each model)
    classes.py    the class mapping: segments of the labelled cases -> the model's classes
    install.py    EngineInstall: pip-installs the sfr-segmentation wheel (tool + library)
    logic.py      SFRLogic: mode, library/tool discovery, model cache
    steps.py      GUI-thread work in short slices (a generator per task; helper threads)
    scene.py      the MRML side (volumes, segmentations, results, undo); imports ``slicer`` and
                  ``vtk`` but no Qt, so it is tested against slicer-core's real MRML classes.
                  Not imported here: ``from SFRSegmentationLib import scene``.
    parameters.py the module's state in a scene parameter node (``from SFRSegmentationLib
                  import parameters``; not imported here either)

Imports go one way: jobs/native/worker below logic, logic below parameters; nothing imports
upwards (tests/slicer/test_packaging.py checks for cycles).

Typical use (arrays are ``slicer.util.arrayFromVolume`` order ``[k, j, i]``, matrices are the
volumes' IJK-to-RAS)::

    logic = SFRLogic()                         # worker process mode; loads nothing yet
    data = TrainingData({0: "background", 1: "liver"})
    data.add_labeled(image, label, ijk_to_ras)
    data.add_unlabeled(other, other_ijk_to_ras)
    job = logic.start_training(data, preset="cpu-small", method="mean-teacher")
    while not job.poll()["finished"]: ...      # a QTimer in the module
    model = job.wait()
    ModelRegistry(folder).add(model)
    labels = model.segment(volume_array, volume_ijk_to_ras)   # same shape, same grid
"""
from .binding import (
    ENV_VAR,
    SUPPORTED_VERSION,
    Cancelled,
    Library,
    LibraryLoadError,
    SfrError,
    candidate_paths,
    find_library_path,
    load_library,
)
from .classes import ClassMapping, map_classes
from .download import Download, DownloadCancelled, LiteMedSamFetch, cached_sam_checkpoint, lite_medsam_state, sam_checkpoint_download
from .geometry import LpsGeometry, ijk_to_ras_to_lps_geometry, lps_geometry_to_ijk_to_ras
from .install import EngineInstall, default_source, installed_engine, local_wheels
from .inputs import (
    NORMALIZATION_LABELS,
    NORMALIZATIONS,
    InputError,
    TrainingData,
    available_memory_bytes,
    build_config,
    check_memory,
    dicom_modality,
    resolve_normalization,
)
from .jobs import DeferredJob, Job, Model
from .logic import (
    IN_PROCESS_RISK,
    LEGACY_MODES,
    METHODS,
    MODES,
    PRESET_LABELS,
    PRESETS,
    SFRLogic,
    default_preset,
    preset_expected_time,
    sam_weights_warning,
    torch_already_loaded,
)
from .modelfile import ModelFileError, read_metadata
from .native import NativeModel
from .registry import ModelEntry, ModelRegistry
from .worker import CliNotFoundError, WorkerModel, find_cli

__all__ = [
    "ENV_VAR",
    "SUPPORTED_VERSION",
    "Cancelled",
    "Library",
    "LibraryLoadError",
    "SfrError",
    "candidate_paths",
    "find_library_path",
    "load_library",
    "Download",
    "DownloadCancelled",
    "cached_sam_checkpoint",
    "sam_checkpoint_download",
    "LpsGeometry",
    "ijk_to_ras_to_lps_geometry",
    "lps_geometry_to_ijk_to_ras",
    "InputError",
    "TrainingData",
    "available_memory_bytes",
    "build_config",
    "check_memory",
    "NORMALIZATIONS",
    "NORMALIZATION_LABELS",
    "dicom_modality",
    "resolve_normalization",
    "DeferredJob",
    "Job",
    "Model",
    "IN_PROCESS_RISK",
    "ClassMapping",
    "map_classes",
    "LiteMedSamFetch",
    "EngineInstall",
    "default_source",
    "installed_engine",
    "local_wheels",
    "lite_medsam_state",
    "LEGACY_MODES",
    "METHODS",
    "MODES",
    "PRESETS",
    "PRESET_LABELS",
    "default_preset",
    "preset_expected_time",
    "sam_weights_warning",
    "SFRLogic",
    "torch_already_loaded",
    "ModelFileError",
    "read_metadata",
    "NativeModel",
    "ModelEntry",
    "ModelRegistry",
    "CliNotFoundError",
    "WorkerModel",
    "find_cli",
]
