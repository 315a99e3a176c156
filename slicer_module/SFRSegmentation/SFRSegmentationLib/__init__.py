"""SFRSegmentationLib: the logic of the 3D Slicer module SFRSegmentation, as plain Python +
numpy + ctypes over libsfr. It imports nothing of Slicer, VTK or Qt, so it runs (and is tested)
in any Python.

Typical use (arrays are ``slicer.util.arrayFromVolume`` order ``[k, j, i]``, matrices are the
volumes' IJK-to-RAS)::

    logic = SFRLogic()                         # finds libsfr; worker mode if torch is loaded
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
    load_library,
)
from .geometry import LpsGeometry, ijk_to_ras_to_lps_geometry, lps_geometry_to_ijk_to_ras
from .logic import (
    METHODS,
    MODES,
    PRESETS,
    InputError,
    Job,
    Model,
    ModelEntry,
    ModelRegistry,
    NativeModel,
    SFRLogic,
    TrainingData,
    WorkerModel,
    build_config,
    torch_already_loaded,
)
from .download import Download, DownloadCancelled, cached_sam_checkpoint, sam_checkpoint_download
from .modelfile import ModelFileError, read_metadata
from .worker import CliNotFoundError, find_cli

__all__ = [
    "ENV_VAR",
    "SUPPORTED_VERSION",
    "Cancelled",
    "Library",
    "LibraryLoadError",
    "SfrError",
    "candidate_paths",
    "load_library",
    "LpsGeometry",
    "ijk_to_ras_to_lps_geometry",
    "lps_geometry_to_ijk_to_ras",
    "METHODS",
    "MODES",
    "PRESETS",
    "InputError",
    "Job",
    "Model",
    "ModelEntry",
    "ModelRegistry",
    "NativeModel",
    "SFRLogic",
    "TrainingData",
    "WorkerModel",
    "build_config",
    "torch_already_loaded",
    "Download",
    "DownloadCancelled",
    "cached_sam_checkpoint",
    "sam_checkpoint_download",
    "ModelFileError",
    "read_metadata",
    "CliNotFoundError",
    "find_cli",
]
