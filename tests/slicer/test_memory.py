"""Bounded memory while training data is gathered (issue 35, item 5): in worker mode each case
is written to a file as soon as it has been copied out of the scene, so the module's peak
memory is that of about one case, not of all of them; the in-memory sink keeps them all (and
its memory check covers all of them before anything is copied). Measured with tracemalloc
(numpy's buffers), which works on every platform."""
import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed: run scripts/setup.sh")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here has no MRML classes (not slicer-core)", allow_module_level=True)

import memory_probe  # noqa: E402
from SFRSegmentationLib import InputError, TrainingData, nifti, worker  # noqa: E402
from SFRSegmentationLib import scene as sc  # noqa: E402

SHAPE = (40, 128, 160)  # 1.6 MB int16 image + 0.8 MB label per case


def test_writer_holds_about_one_case_the_memory_sink_all(tmp_path):
    scene, pairs, unlabeled = memory_probe.build_scene(SHAPE, 4, 2)
    voxels = int(np.prod(SHAPE))
    one_case = voxels * 3  # image + label
    everything = 6 * voxels * 2 + 4 * voxels

    peak, _, writer = memory_probe.gather(pairs, unlabeled, lambda classes: worker.DecathlonWriter(classes, str(tmp_path)))
    assert writer.counts() == (4, 2)
    assert peak < 2.0 * one_case, f"the writer held {peak / one_case:.2f} cases at its peak"
    # What was written is what the scene holds.
    img, m = nifti.read(next((writer.data_dir / "imagesTr").glob("L0002_*")))
    assert np.array_equal(img, sc.volume_array(pairs[2][0])) and np.allclose(m, sc.volume_matrix(pairs[2][0]), atol=1e-5)
    lab, _ = nifti.read(next((writer.data_dir / "labelsTr").glob("L0002_*")))
    assert set(np.unique(lab)) == {0, 1, 2}
    assert [p.name[:5] for p in sorted((writer.data_dir / "imagesTr").iterdir())] == ["L0000", "L0001", "L0002", "L0003", "U0000", "U0001"]
    writer.close()
    assert not writer.dir.exists()

    peak_all, _, data = memory_probe.gather(pairs, unlabeled, TrainingData)
    assert data.counts() == (4, 2)
    assert peak_all >= everything, "the in-memory sink should hold every case"
    scene.Clear(1)


def test_the_memory_check_covers_what_the_sink_will_hold(monkeypatch, tmp_path):
    import SFRSegmentationLib.inputs as inputs

    scene, pairs, unlabeled = memory_probe.build_scene((20, 32, 40), 2, 1)
    voxels = 20 * 32 * 40
    # Room for two cases at a time, not for all three: the writer goes ahead, the memory sink
    # (which keeps all three) is refused before anything is copied.
    monkeypatch.setattr(inputs, "available_memory_bytes", lambda: 7 * voxels)
    collector = sc.TrainingCollector(pairs, unlabeled, log=lambda m: None,
                                     sink_factory=lambda c: worker.DecathlonWriter(c, str(tmp_path)))
    collector.close()
    with pytest.raises(InputError, match="keeping the 3 cases of the scene in memory .* use the worker process mode"):
        sc.TrainingCollector(pairs, unlabeled, log=lambda m: None)
    # A system that does not say: no check, and the log says so.
    monkeypatch.setattr(inputs, "available_memory_bytes", lambda: None)
    said = []
    sc.TrainingCollector(pairs, unlabeled, log=said.append).close()
    assert any("does not report the memory available" in s for s in said)
    scene.Clear(1)


def test_a_closed_writer_leaves_no_folder(tmp_path):
    writer = worker.DecathlonWriter({0: "background", 1: "x"}, str(tmp_path))
    label = np.zeros((4, 5, 6), np.uint8)
    label[1, 1, 1] = 1
    writer.add_labeled(np.ones((4, 5, 6), np.int16), label, np.eye(4))
    writer.close()
    assert not writer.dir.exists()
    with pytest.raises(Exception, match="cancelled"):
        writer.add_unlabeled(np.ones((4, 5, 6), np.int16), np.eye(4))
    assert not writer.dir.exists()
