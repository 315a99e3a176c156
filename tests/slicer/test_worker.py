"""Worker-process mode (the `sfr` tool in a child process, for a Slicer whose Python already
imported another PyTorch): same job interface, end to end, cancellation, errors."""
import time

import numpy as np
import pytest

from conftest import SHAPE, dice, oblique_matrix, phantom, run_to_end, training_data
from conftest import cli_path
from SFRSegmentationLib import Cancelled, CliNotFoundError, InputError, ModelRegistry, SfrError, WorkerModel, find_cli

M = oblique_matrix()


def test_worker_trains_and_segments_end_to_end(worker_trained, worker_logic, tmp_path):
    model, polls = worker_trained
    assert isinstance(model, WorkerModel)
    stages = [p["stage"] for p in polls]
    assert "retrain" in stages and polls[-1]["finished"]
    assert any(p["loss"] is not None for p in polls if p["stage"] == "retrain")
    assert model.class_names() == {0: "background", 1: "blob"}
    assert model.metadata()["spacing"] == pytest.approx([0.9, 1.1, 2.0], abs=1e-4)
    image, truth = phantom(11)
    job = model.start_segmentation(image, M)
    seg_polls = run_to_end(job, timeout=60)
    labels = job.wait()
    assert seg_polls[-1]["finished"]
    assert labels.shape == SHAPE and labels.dtype == np.uint8
    assert dice(labels, truth) > 0.3
    # Saved into a model folder, it is listed and segments the same when loaded back.
    entry = ModelRegistry(tmp_path).add(model, "worker-model")
    assert entry.path.is_file() and entry.class_names[1] == "blob"
    back = worker_logic.load_model(entry.path)
    assert np.array_equal(back.segment(image, M), labels)


def test_worker_and_in_process_models_agree(worker_trained, native_logic, tmp_path):
    """The same model file segments the same in both modes (same library inside)."""
    model, _ = worker_trained
    path = model.save(tmp_path / "m.sfrmodel")
    native = native_logic.load_model(path)
    image, _ = phantom(14)
    a, b = native.segment(image, M), model.segment(image, M)
    assert (a == b).mean() > 0.999
    native.close()


def test_worker_cancel_ends_the_process_and_cleans_up(worker_logic):
    job = worker_logic.start_training(training_data(2, 0), config={"preset": "test-tiny", "sfr": False, "vnet": {"iterations": 100000}})
    t0 = time.time()
    while job.poll()["stage"] != "retrain" and time.time() - t0 < 60:
        time.sleep(0.1)
    assert not job.poll()["finished"]
    job.cancel()
    t1 = time.time()
    with pytest.raises(Cancelled):
        job.wait()
    assert time.time() - t1 < 8.0
    assert job._proc.proc.poll() is not None
    assert not job._dir.exists(), f"temporary folder left behind: {job._dir}"


def test_worker_failure_carries_the_tool_message(worker_logic):
    job = worker_logic.start_training(training_data(1, 0), config={"preset": "test-tiny", "vnet": {"iterationz": 3}})
    run_to_end(job, timeout=60)
    assert "iterationz" in job.poll()["message"]
    with pytest.raises(SfrError, match="iterationz"):
        job.wait()


def test_missing_cli_names_every_path_tried(tmp_path, monkeypatch):
    monkeypatch.delenv("SFR_CLI", raising=False)
    monkeypatch.delenv("SFR_LIBRARY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    fake = tmp_path / "mod" / "SFRSegmentation"
    fake.mkdir(parents=True)
    import SFRSegmentationLib.worker as worker

    monkeypatch.setattr(worker, "module_dir", lambda: fake)
    with pytest.raises(CliNotFoundError) as e:
        find_cli(None, str(tmp_path / "libdir" / "libsfr.so"))
    msg = str(e.value)
    for p in (tmp_path / "libdir" / "sfr", fake / "lib" / "sfr", fake / "bin" / "sfr"):
        assert str(p) in msg, msg


def test_a_given_cli_path_that_points_nowhere_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SFR_CLI", str(cli_path()))
    with pytest.raises(CliNotFoundError, match="set in the module is not usable: .*my-sfr does not exist"):
        find_cli(str(tmp_path / "my-sfr"))
    monkeypatch.setenv("SFR_CLI", str(tmp_path / "nope"))
    with pytest.raises(CliNotFoundError, match="SFR_CLI is not usable"):
        find_cli(None)


def test_worker_process_gets_the_environment_it_is_given(tmp_path):
    """Inside Slicer the module passes slicer.util.startupEnvironment(): the child sees exactly
    that environment, not Slicer's (launcher paths, another extension's libraries)."""
    import os
    import sys

    from SFRSegmentationLib.worker import WorkerProcess

    code = "import json, os; print(json.dumps({'message': os.environ.get('SFR_TEST_ENV', 'unset') + '|' + os.environ.get('LD_LIBRARY_PATH', 'unset')}))"
    os.environ["LD_LIBRARY_PATH"] = "/slicer/launcher/libs"
    try:
        p = WorkerProcess([sys.executable, "-c", code], tmp_path, env={"SFR_TEST_ENV": "startup", "PATH": os.environ.get("PATH", "")})
        p.wait(30)
        assert p.poll()["message"] == "startup|unset"
        inherited = WorkerProcess([sys.executable, "-c", code], tmp_path)
        inherited.wait(30)
        assert inherited.poll()["message"].endswith("|/slicer/launcher/libs")
    finally:
        del os.environ["LD_LIBRARY_PATH"]


def test_worker_jobs_write_and_read_files_off_the_calling_thread(worker_logic, monkeypatch):
    """The NIfTI writes happen on the job's thread: start_training returns while they are
    still blocked, and cancelling then stops the job before any process starts."""
    import threading

    import SFRSegmentationLib.worker as worker

    gate = threading.Event()
    real_write = worker.nifti.write
    calls = []

    def slow_write(*args, **kwargs):
        calls.append(threading.current_thread().name)
        gate.wait(30)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(worker.nifti, "write", slow_write)
    job = worker_logic.start_training(training_data(2, 1), preset="test-tiny")
    try:
        p = job.poll()
        assert p["stage"] == "prepare" and not p["finished"]
        t0 = time.time()
        while not calls and time.time() - t0 < 30:
            time.sleep(0.01)
        assert calls and calls[0] == "sfr-worker-job"
        job.cancel()
    finally:
        gate.set()
    with pytest.raises(Cancelled):
        job.wait(60)
    assert job._proc is None  # no worker process was started
    assert not job._dir.exists()


def test_segmentation_through_the_logic_loads_the_model_off_thread(worker_trained, worker_logic, tmp_path):
    model, _ = worker_trained
    path = model.save(tmp_path / "m.sfrmodel")
    image, truth = phantom(11)
    job = worker_logic.start_segmentation(path, image, M)
    run_to_end(job, timeout=60)
    labels = job.wait()
    assert labels.shape == SHAPE and dice(labels, truth) > 0.3
    assert worker_logic.model(path) is worker_logic.model(path)  # cached
    worker_logic.forget_model(path)
    bad = worker_logic.start_segmentation(tmp_path / "missing.sfrmodel", image, M)
    run_to_end(bad, timeout=30)
    assert "does not exist" in bad.poll()["message"]
    with pytest.raises(InputError, match="missing.sfrmodel does not exist"):
        bad.wait()


def test_the_gui_thread_never_waits_for_the_version_check(tmp_path):
    """The panel checks `sfr --version` on a helper thread; meanwhile the GUI thread asks the
    logic where jobs run (describe, cli). Those must not wait for the process."""
    import threading

    from SFRSegmentationLib import SFRLogic

    slow = tmp_path / "sfr"
    release = tmp_path / "release"
    slow.write_text(f"#!/bin/sh\nwhile [ ! -e {release} ]; do sleep 0.05; done\necho 'sfr 0.1.0'\n")
    slow.chmod(0o755)
    logic = SFRLogic(mode="worker", cli_path=str(slow))
    check = threading.Thread(target=logic.check, daemon=True)
    check.start()
    try:
        time.sleep(0.3)  # the check is running the (blocked) process
        info = {}
        asking = threading.Thread(target=lambda: info.update(logic.describe()), daemon=True)
        asking.start()
        asking.join(10)
        assert info, "describe() waited for the version check"
        assert info["path"] == str(slow) and info["version"] is None
    finally:
        release.write_text("")
    check.join(30)
    assert logic.describe()["version"] == "0.1.0"


@pytest.mark.parametrize("mode", ["worker", "in-process"])
def test_a_model_that_failed_its_training_check_is_marked(mode, worker_logic, native_logic, tmp_path):
    """A class the network cannot learn (voxels scattered at random, no trace in the image)
    fails the library's training check; the model still comes back (the worker passes
    --allow-weak), and the registry entry the panel lists carries the warning that it shows in
    red before the model is used."""
    import SFRSegmentationLib as sl
    from SFRSegmentationLib import modelfile

    rng = np.random.default_rng(3)
    data = sl.TrainingData({0: "background", 1: "blob", 2: "ghost"})
    for s in range(2):
        img, lab = phantom(s)
        lab = lab.copy()
        lab[(lab == 0) & (rng.random(lab.shape) < 0.02)] = 2
        data.add_labeled(img, lab, M, label_ijk_to_ras=M)
    logic = worker_logic if mode == "worker" else native_logic
    job = logic.start_training(data, preset="test-tiny")
    run_to_end(job)
    model = job.wait()
    entry = ModelRegistry(tmp_path).add(model, f"weak-{mode}")
    model.close()
    assert "ghost" in modelfile.failed_classes(entry.metadata)
    assert entry.check_warning and "'ghost'" in entry.check_warning and "Do not use this model" in entry.check_warning
    assert entry.summary.startswith("FAILED: ghost")
    # A model whose classes all passed carries no warning.
    ok = {"training": {"class_check": {"judged_on": "fit", "cases": 2, "classes": [{"class": 1, "name": "blob", "verdict": "ok"}]}}}
    assert modelfile.check_warning(ok) is None and modelfile.failed_classes({}) == []
