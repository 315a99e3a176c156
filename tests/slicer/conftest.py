"""Shared fixtures for the SFRSegmentationLib tests: paths of the built library and tool,
oblique anisotropic phantoms in Slicer's [k, j, i] order, and trained tiny models (one per
execution mode, trained once per session)."""
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "slicer_module" / "SFRSegmentation"
sys.path.insert(0, str(MODULE_DIR))

import SFRSegmentationLib as sl  # noqa: E402


def library_path() -> Path:
    return Path(os.environ.get("SFR_LIBRARY") or REPO / "target" / "release" / "libsfr.so")


def cli_path() -> Path:
    return Path(os.environ.get("SFR_CLI") or REPO / "target" / "release" / "sfr")


def rotation(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def oblique_matrix(spacing=(0.9, 1.1, 2.0), origin=(12.5, -30.0, 7.25)) -> np.ndarray:
    """An IJK-to-RAS matrix with rotated axes (about two axes) and anisotropic voxels."""
    m = np.eye(4)
    m[:3, :3] = rotation(2, 0.3) @ rotation(0, -0.2) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


SHAPE = (20, 24, 28)  # [k, j, i]: deliberately all different, so a transposition cannot hide


def phantom(seed: int, shape=SHAPE):
    """A bright ellipsoid off the centre (so a flip of any axis would move it) in noise, as
    int16 like a CT/MR volume; label = the ellipsoid."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    k, j, i = np.mgrid[:nz, :ny, :nx]
    ck, cj, ci = 0.4 * nz + rng.integers(-1, 2), 0.42 * ny + rng.integers(-1, 2), 0.6 * nx + rng.integers(-1, 2)
    label = (((i - ci) / (0.25 * nx)) ** 2 + ((j - cj) / (0.25 * ny)) ** 2 + ((k - ck) / (0.25 * nz)) ** 2 < 1).astype(np.uint8)
    image = (label * 100.0 + 25.0 * rng.standard_normal(shape) + 40.0).astype(np.int16)
    return image, label


def organs(shape, seed=0):
    """Five classes in blocks that touch and leave gaps, placed relative to the shape (so a
    bigger volume has proportionally bigger organs), none at the border (the bounding box
    crop is exercised); class 4 is named like Slicer's placeholder for a later segment."""
    nk, nj, ni = shape
    lab = np.zeros(shape, dtype=np.uint8)
    lab[nk // 10 : nk // 2, nj // 8 : nj // 2, ni // 6 : ni // 2] = 1
    lab[nk // 3 : 3 * nk // 4, nj // 2 : 7 * nj // 8, ni // 2 : 5 * ni // 6] = 2
    lab[nk // 2 : 2 * nk // 3, nj // 5 : nj // 3, 2 * ni // 3 : 4 * ni // 5] = 3
    lab[nk // 5 : nk // 4, 2 * nj // 3 : 3 * nj // 4, ni // 5 : ni // 4] = 4
    rng = np.random.default_rng(seed)
    lab[rng.random(shape) < 0.001] = 5  # scattered voxels: the bounding box spans nearly all
    return lab


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def training_data(n_labeled=2, n_unlabeled=2, matrix=None) -> "sl.TrainingData":
    m = oblique_matrix() if matrix is None else matrix
    data = sl.TrainingData({0: "background", 1: "blob"})
    for s in range(n_labeled):
        img, lab = phantom(s)
        data.add_labeled(img, lab, m, label_ijk_to_ras=m)
    for s in range(n_labeled, n_labeled + n_unlabeled):
        img, _ = phantom(s)
        data.add_unlabeled(img, m)
    return data


def run_to_end(job, timeout=600.0):
    """Polls like the module's QTimer until the job ends; returns the polls seen."""
    # Generous: the machines these run on are often shared (a 2-core CPU with a load of 10 made
    # the tiny worker training take over 2 minutes). The tests check behaviour, not speed.
    seen = []
    t0 = time.time()
    while True:
        p = job.poll()
        seen.append(p)
        if p["finished"]:
            return seen
        if time.time() - t0 > timeout:
            job.cancel()
            raise AssertionError(f"job still running after {timeout} s: {p}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def native_logic():
    return sl.SFRLogic(library_path=str(library_path()), mode="in-process")


@pytest.fixture(scope="session")
def worker_logic():
    return sl.SFRLogic(library_path=str(library_path()), mode="worker", cli_path=str(cli_path()))


@pytest.fixture(scope="session")
def native_trained(native_logic):
    """(model, polls, callback events) of an in-process test-tiny run on oblique phantoms."""
    events = []
    job = native_logic.start_training(training_data(), preset="test-tiny", on_progress=events.append)
    polls = run_to_end(job)
    model = job.wait()
    yield model, polls, events
    model.close()


@pytest.fixture(scope="session")
def worker_trained(worker_logic):
    job = worker_logic.start_training(training_data(), preset="test-tiny")
    polls = run_to_end(job)
    model = job.wait()
    yield model, polls
    model.close()
