"""In-process mode against the real libsfr: Slicer-ordered arrays with an oblique anisotropic
IJK-to-RAS in, a trained tiny model out, segmentation back on the same grid; progress,
cancellation, errors, the model folder."""
import time

import numpy as np
import pytest

from conftest import SHAPE, dice, oblique_matrix, phantom, run_to_end, training_data
from SFRSegmentationLib import PRESETS, Cancelled, InputError, Model, ModelRegistry, SfrError, TrainingData
from SFRSegmentationLib.native import _NativeDataset

M = oblique_matrix()


def test_dataset_counts_cross_the_abi(native_logic):
    ds = _NativeDataset(native_logic.library, training_data(2, 3))
    try:
        assert ds.counts() == (2, 3)
    finally:
        ds.free()


def test_training_reports_progress_by_poll_and_callback(native_trained):
    model, polls, events = native_trained
    stages = [p["stage"] for p in polls]
    assert "retrain" in stages, stages
    assert polls[-1]["finished"]
    for p in polls:
        assert 0 <= p["step"] <= max(p["total"], p["step"]) and set(p) >= {"stage", "step", "total", "loss", "eta_seconds", "message", "finished"}
    retrain = [p for p in polls if p["stage"] == "retrain" and p["step"] > 0]
    assert retrain and all(p["loss"] is None or np.isfinite(p["loss"]) for p in retrain)
    assert any(p["loss"] is not None for p in retrain)
    # The callback (called from the job's thread) saw the stages too, and the end.
    assert "retrain" in [e["stage"] for e in events]
    assert events[-1]["finished"]


def test_model_metadata_describes_the_training(native_trained):
    model, _, _ = native_trained
    meta = model.metadata()
    assert model.class_names() == {0: "background", 1: "blob"}
    assert model.num_classes == 2
    assert meta["training"]["preset"] == "test-tiny"
    assert meta["training"]["labeled_cases"] == 2 and meta["training"]["unlabeled_cases"] == 2
    # The training spacing is recorded in (x, y, z) = (i, j, k) order: the anisotropic spacing
    # of the oblique matrix crossed the ABI on the right axes.
    assert meta["spacing"] == pytest.approx([0.9, 1.1, 2.0], abs=1e-6)


def test_segmentation_keeps_shape_dtype_and_finds_the_blob(native_trained):
    model, _, _ = native_trained
    image, truth = phantom(11)
    labels = model.segment(image, M)
    assert labels.shape == SHAPE and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}
    # Chance level is about the blob's volume fraction (~7%); a flipped or transposed grid
    # would put the prediction away from the off-centre blob.
    d = dice(labels, truth)
    assert d > 0.3, f"Dice {d:.3f} (blob fraction {truth.mean():.3f})"
    # Arrays arriving in another dtype or memory layout give the same answer.
    assert np.array_equal(model.segment(np.asfortranarray(image.astype(np.float64)), M), labels)


def test_segmentation_job_and_probabilities_agree_with_sync(native_trained):
    model, _, _ = native_trained
    image, _ = phantom(12)
    labels, probs = model.segment(image, M, probabilities=True)
    assert probs.shape == (2,) + SHAPE and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=0), 1.0, atol=1e-4)
    assert np.array_equal(probs.argmax(axis=0), labels)
    job = model.start_segmentation(image, M)
    polls = run_to_end(job, timeout=60)
    assert polls[-1]["finished"]
    assert np.array_equal(job.wait(), labels)
    with pytest.raises(SfrError, match="already taken"):
        job.wait()


def test_segment_refuses_bad_input(native_trained):
    model, _, _ = native_trained
    with pytest.raises(InputError, match="3D"):
        model.segment(np.zeros((4, 4)), M)


def test_model_folder_save_list_load_remove(native_logic, native_trained, tmp_path):
    model, _, _ = native_trained
    reg = ModelRegistry(tmp_path / "models")
    assert reg.list() == []
    e1 = reg.add(model, "liver")
    e2 = reg.add(model, "liver")  # never overwrites
    assert (e1.name, e2.name) == ("liver", "liver-2")
    (tmp_path / "models" / "broken.sfrmodel").write_bytes(b"junk")
    entries = {e.name: e for e in reg.list()}
    assert set(entries) == {"liver", "liver-2", "broken"}
    assert entries["broken"].error and "not an SFR model" in entries["broken"].error
    assert entries["liver"].class_names == {0: "background", 1: "blob"}
    assert entries["liver"].created is not None
    assert entries["liver"].validation_dice is None  # test-tiny holds out no validation case
    back = reg.load("liver", native_logic)
    assert native_logic.load_model(e1.path).metadata() == model.metadata()
    image, _ = phantom(13)
    assert np.array_equal(back.segment(image, M), model.segment(image, M))
    back.close()
    reg.remove("liver-2")
    assert {e.name for e in reg.list()} == {"liver", "broken"}
    with pytest.raises(KeyError):
        reg.remove("../models/liver")


def test_validation_dice_is_listed(native_logic, tmp_path):
    """With a validation case held out, the model's metadata carries its Dice."""
    data = training_data(2, 0)
    job = native_logic.start_training(data, config={"preset": "test-tiny", "validation_cases": 1, "sfr": False})
    run_to_end(job)
    model = job.wait()
    entry = ModelRegistry(tmp_path).add(model)
    assert entry.validation_dice is not None and 0.0 <= entry.validation_dice <= 1.0
    assert "validation Dice" in entry.summary
    model.close()


def test_cancel_stops_training_within_seconds(native_logic):
    job = native_logic.start_training(training_data(2, 0), config={"preset": "test-tiny", "sfr": False, "vnet": {"iterations": 100000}})
    t0 = time.time()
    while job.poll()["step"] == 0 and time.time() - t0 < 60:
        time.sleep(0.05)
    assert not job.poll()["finished"]
    job.cancel()
    job.cancel()  # idempotent
    t1 = time.time()
    with pytest.raises(Cancelled):
        job.wait()
    assert time.time() - t1 < 5.0


def test_config_mistakes_are_reported_with_the_key(native_logic):
    with pytest.raises(SfrError) as e:
        job = native_logic.start_training(training_data(1, 0), config={"preset": "test-tiny", "vnet": {"iterationz": 3}})
        job.wait()
    assert "iterationz" in str(e.value)
    assert e.value.status == "SFR_ERR_INVALID_ARGUMENT"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_the_panel_offers_is_one_the_library_knows(native_logic, preset):
    # The library resolves the preset before it checks the keys: an unknown preset would be
    # the error here, a known one leaves the misspelt key to be named.
    with pytest.raises(SfrError) as e:
        job = native_logic.start_training(training_data(1, 0), config={"preset": preset, "vnet": {"iterationz": 3}})
        job.wait()
    assert "iterationz" in str(e.value) and "unknown preset" not in str(e.value)


def test_an_unknown_preset_is_refused_with_the_known_ones(native_logic):
    with pytest.raises(SfrError) as e:
        job = native_logic.start_training(training_data(1, 0), config={"preset": "cpu-huge"})
        job.wait()
    assert "cpu-huge" in str(e.value) and all(p in str(e.value) for p in PRESETS)


def test_mismatched_classes_are_refused_before_training(native_logic):
    data = TrainingData({0: "background", 1: "blob"})
    img, lab = phantom(0)
    with pytest.raises(InputError, match="outside the classes"):
        data.add_labeled(img, lab * 2, M)


def test_in_process_training_refuses_what_memory_cannot_hold(native_logic, monkeypatch):
    """A clear error before the copies are made, instead of the out-of-memory killer taking
    Slicer down; the worker mode is named as the way out."""
    import SFRSegmentationLib.inputs as inputs

    monkeypatch.setattr(inputs, "available_memory_bytes", lambda: 1000)
    job = native_logic.start_training(training_data(2, 2), preset="test-tiny")
    run_to_end(job, timeout=30)
    with pytest.raises(InputError, match=r"training on 4 volumes in this process needs about .* GB of memory.*worker process"):
        job.wait()


def test_deferred_jobs_report_preparation_and_errors():
    import threading

    from SFRSegmentationLib import DeferredJob

    gate = threading.Event()

    def start(reporter):
        reporter.report("step one", 1, 3)
        gate.wait(30)
        reporter.check()
        raise ValueError("bad input found while preparing")

    job = DeferredJob(start)
    t0 = time.time()
    while job.poll()["message"] != "step one" and time.time() - t0 < 10:
        time.sleep(0.01)
    p = job.poll()
    assert (p["stage"], p["step"], p["total"], p["finished"]) == ("prepare", 1, 3, False)
    gate.set()
    run_to_end(job, timeout=10)
    assert job.poll()["message"] == "bad input found while preparing"
    with pytest.raises(ValueError, match="bad input"):
        job.wait()
    gate.clear()
    cancelled = DeferredJob(start)
    cancelled.cancel()
    gate.set()
    with pytest.raises(Cancelled):
        cancelled.wait()


def test_segmentation_through_the_logic_in_process(native_trained, native_logic, tmp_path):
    model, _, _ = native_trained
    path = model.save(tmp_path / "m.sfrmodel")
    image, _ = phantom(12)
    job = native_logic.start_segmentation(path, image, M)
    run_to_end(job, timeout=60)
    assert np.array_equal(job.wait(), model.segment(image, M))
    native_logic.forget_model(path)
