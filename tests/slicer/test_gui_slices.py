"""The scene work cut into GUI-thread slices (SFRSegmentationLib/steps.py, scene.py) against
Slicer's real MRML classes (slicer-core): the increments give exactly what the one-shot Slicer
calls give (a result imported with ImportLabelmapToSegmentationNode, segments exported with
ExportSegmentsToLabelmapNode), and each GUI-thread slice does a bounded amount of work — at
most one segment attached, at most SLICE_BYTES of voxels copied — whatever the volume's size.
The bounds are asserted, not times (times depend on the machine; the longest slice is printed
for information, and scripts/bench_slicer_gui.py measures a 512x512x300 volume)."""
import re
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed: run scripts/setup.sh")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here has no MRML classes (not slicer-core)", allow_module_level=True)

from conftest import oblique_matrix, organs, phantom  # noqa: E402
from SFRSegmentationLib import Cancelled, InputError  # noqa: E402
from SFRSegmentationLib import scene as sc  # noqa: E402
from SFRSegmentationLib import steps  # noqa: E402

M = oblique_matrix()
CLASSES = {0: "background", 1: "liver", 2: "spleen", 3: "kidney", 4: "Label_5", 5: "aorta"}


@pytest.fixture
def scenes():
    made = []

    def make():
        s = slicer.vtkMRMLScene()
        made.append(s)
        return s

    yield make
    for s in made:
        s.Clear(1)


def slicer_import(labels, volume_node, class_names, segmentation_node=None):
    """The reference: the one-shot import the module used before the increments (one
    ImportLabelmapToSegmentationNode call, which scans the whole volume on the GUI thread),
    then the same naming and colouring."""
    scene = volume_node.GetScene()
    created = segmentation_node is None
    if created:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} SFR")
        segmentation_node.SetAttribute(sc.RESULT_ATTRIBUTE, "1")
        segmentation_node.SetNodeReferenceID(sc.SOURCE_VOLUME_ROLE, volume_node.GetID())
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    existing = {segmentation.GetSegment(s).GetName(): segmentation.GetSegment(s).GetColor() for s in segmentation.GetSegmentIDs()}
    before = set(segmentation.GetSegmentIDs())
    dtype = np.uint8 if labels.max() < 256 else np.uint16
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(sc._image_data(labels.astype(dtype, copy=False)))
    m = sc.vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    image.SetImageToWorldMatrix(m)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(image, segmentation_node, "", "")
    added = [s for s in segmentation.GetSegmentIDs() if s not in before]
    for segment_id in added:
        segment = segmentation.GetSegment(segment_id)
        value = int(segment.GetLabelValue())
        name = class_names.get(value, f"class {value}")
        segment.SetColor(*sc.class_color(name, value, scene, existing))
        segment.SetName(sc.unique_segment_name(segmentation, name, exclude=segment_id))
    return segmentation_node, added


def state(node):
    """All a user or Slicer sees of a segmentation: per segment (in order) its name, colour,
    label value and layer, and each labelmap's extent, geometry, scalar type and voxels. (Not
    the segment IDs: Slicer 5.13 makes them random, "S_" + 16 characters.)"""
    seg = node.GetSegmentation()
    out = {"name": node.GetName(), "layers": seg.GetNumberOfLayers(), "segments": []}
    for segment_id in seg.GetSegmentIDs():
        segment = seg.GetSegment(segment_id)
        image = segment.GetRepresentation(sc.BINARY_LABELMAP)
        entry = {
            "name": segment.GetName(),
            "color": tuple(round(c, 6) for c in segment.GetColor()),
            "value": segment.GetLabelValue(),
            "layer": seg.GetLayerIndex(segment_id),
            "extent": tuple(image.GetExtent()),
            "matrix": np.round(sc._matrix_of(image), 9).tolist(),
            "type": image.GetScalarTypeAsString(),
        }
        voxels = sc._scalars_view(image, "segment").copy()
        out["segments"].append((entry, voxels))
    return out


def assert_same_state(a, b):
    assert {k: v for k, v in a.items() if k != "segments"} == {k: v for k, v in b.items() if k != "segments"}
    assert [e for e, _ in a["segments"]] == [e for e, _ in b["segments"]]
    for (ea, va), (_, vb) in zip(a["segments"], b["segments"]):
        assert va.dtype == vb.dtype and np.array_equal(va, vb), ea["name"]


def drive(task, between=None):
    """Steps a task the way the panel's timer does; ``between(task)`` runs after every
    GUI-thread slice (what the GUI could do between two ticks). Returns the task."""
    slices = task.slices
    while not task.finished:
        task.step()
        if task.slices != slices:
            slices = task.slices
            if between is not None and not task.finished:
                between(task)
        else:
            time.sleep(0.001)  # a helper thread is working
    return task


def new_scene_with_volume(scenes, shape, name="CT"):
    scene = scenes()
    image = np.zeros(shape, dtype=np.int16)
    return scene, sc.add_volume(scene, image, M, name)


# ---------------------------------------------------------------------------------------------
# Import: increments == Slicer's one call


@pytest.mark.parametrize("shape", [(20, 24, 28), (37, 50, 61)])
def test_incremental_import_equals_slicers_import_of_a_multi_class_result(scenes, shape):
    labels = organs(shape)
    _, v1 = new_scene_with_volume(scenes, shape)
    _, v2 = new_scene_with_volume(scenes, shape)
    reference, added = slicer_import(labels, v1, CLASSES)
    record = sc.apply_labels(labels, v2, CLASSES)
    assert record.created and len(record.segment_ids) == len(added) == 5
    assert_same_state(state(reference), state(record.segmentation_node))
    names = [record.names[s] for s in record.segment_ids]
    # class 4 is literally named "Label_5": the placeholder of the later segment made it unique
    assert names == ["liver", "spleen", "kidney", "Label_5 (SFR)", "aorta"]
    assert state(record.segmentation_node)["layers"] == 1  # one shared labelmap, as Slicer's import
    assert record.voxels == {s: int(np.count_nonzero(labels == c)) for s, c in zip(record.segment_ids, (1, 2, 3, 4, 5))}
    # And the voxels on the volume's grid are the labels.
    back, _ = sc.export_label(v2, record.segmentation_node, [CLASSES[c] if c != 4 else "Label_5 (SFR)" for c in range(1, 6)])
    assert np.array_equal(back, labels)


def test_incremental_resegmentation_into_an_existing_node_equals_slicers_import(scenes):
    shape = (30, 40, 44)
    results = []
    for importer in ("slicer", "increments"):
        scene, volume = new_scene_with_volume(scenes, shape)
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
        manual = np.zeros(shape, np.uint8)
        manual[3:20, 5:30, 10:40] = 1
        manual[22:28, 2:6, 2:6] = 2
        names = {0: "background", 1: "liver", 2: "tumour"}
        sc.apply_labels(manual, volume, names, node)
        before = state(node)
        labels = organs(shape, seed=1)
        if importer == "slicer":
            slicer_import(labels, volume, CLASSES, node)
            slicer_import(labels, volume, CLASSES, node)
        else:
            sc.apply_labels(labels, volume, CLASSES, node)
            task = drive(steps.Task(sc.import_labels_steps(labels, volume, CLASSES, node)))
            record = task.take()
        after = state(node)
        # the manual segments: untouched
        assert_same_state({**before, "segments": before["segments"]}, {**before, "segments": after["segments"][:2]})
        results.append(after)
    assert_same_state(results[0], results[1])
    assert [e["name"] for e, _ in results[1]["segments"]][-5:] == ["liver (SFR 2)", "spleen (SFR)", "kidney (SFR)", "Label_5 (SFR 2)", "aorta (SFR)"]
    assert sc.undo(record)
    assert_same_state(state(node), {**results[1], "layers": 2, "segments": results[1]["segments"][:7]})


def test_incremental_import_of_uint16_classes_equals_slicers_import(scenes):
    shape = (12, 14, 16)
    labels = np.zeros(shape, np.uint16)
    labels[2:5, 3:9, 4:7] = 300
    labels[6:10, 1:4, 9:15] = 2
    names = {0: "background", 2: "two", 300: "three hundred"}
    _, v1 = new_scene_with_volume(scenes, shape)
    _, v2 = new_scene_with_volume(scenes, shape)
    reference, _ = slicer_import(labels, v1, names)
    record = sc.apply_labels(labels, v2, names)
    assert_same_state(state(reference), state(record.segmentation_node))
    assert state(record.segmentation_node)["segments"][0][0]["type"] == "unsigned short"


# ---------------------------------------------------------------------------------------------
# Import: bounded GUI-thread slices


def import_slices(scenes, shape, n_classes=5):
    scene, volume = new_scene_with_volume(scenes, shape)
    labels = organs(shape)
    added_per_slice = []

    def between(task):
        node = scene.GetFirstNodeByName("CT SFR")
        n = node.GetSegmentation().GetNumberOfSegments() if node is not None else 0
        added_per_slice.append(n - sum(added_per_slice))

    task = drive(steps.Task(sc.import_labels_steps(labels, volume, CLASSES)), between)
    record = task.take()
    added_per_slice.append(len(record.segment_ids) - sum(added_per_slice))
    return task, added_per_slice


def test_each_gui_slice_of_an_import_attaches_at_most_one_segment_whatever_the_volume_size(scenes):
    small_task, small = import_slices(scenes, (16, 20, 24))
    big_task, big = import_slices(scenes, (64, 160, 192))  # 82 times the voxels
    # One slice for the checks (the scan runs on a helper thread), then one per segment.
    assert small == big == [0, 1, 1, 1, 1, 1]
    assert small_task.slices == big_task.slices == 6
    print(f"\nlongest GUI-thread slice of the import: {small_task.longest_slice * 1e3:.1f} ms (16x20x24), "
          f"{big_task.longest_slice * 1e3:.1f} ms (64x160x192)")


def test_import_never_scans_the_volume_on_the_gui_thread(scenes, monkeypatch):
    # The scan Slicer's import does (GetAllLabelValues, CalculateEffectiveExtent) is ours, on a
    # helper thread: the GUI-thread slices never call Slicer's import.
    def refuse(*a, **k):
        raise AssertionError("ImportLabelmapToSegmentationNode was called")

    monkeypatch.setattr(sc, "_segmentations_logic", lambda: type("L", (), {"ImportLabelmapToSegmentationNode": refuse}))
    _, volume = new_scene_with_volume(scenes, (20, 24, 28))
    assert len(sc.apply_labels(organs((20, 24, 28)), volume, CLASSES).segment_ids) == 5


def test_close_scene_between_two_slices_of_an_import_discards_the_result(scenes):
    scene, volume = new_scene_with_volume(scenes, (20, 24, 28))
    closed = []

    def between(task):
        node = scene.GetFirstNodeByName("CT SFR")
        if node is not None and node.GetSegmentation().GetNumberOfSegments() == 2 and not closed:
            scene.Clear(0)
            closed.append(True)
            sc.add_volume(scene, np.zeros((20, 24, 28), np.int16), M, "next")  # may reuse the IDs

    task = drive(steps.Task(sc.import_labels_steps(organs((20, 24, 28)), volume, CLASSES)), between)
    with pytest.raises(InputError, match="removed from the scene"):
        task.take()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_cancel_between_two_slices_removes_what_was_added(scenes):
    scene, volume = new_scene_with_volume(scenes, (20, 24, 28))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    manual = np.zeros((20, 24, 28), np.uint8)
    manual[1:4, 1:4, 1:4] = 1
    keep = sc.apply_labels(manual, volume, {1: "mine"}, node).segment_ids

    def between(task):
        if node.GetSegmentation().GetNumberOfSegments() == 3:
            task.cancel()

    task = drive(steps.Task(sc.import_labels_steps(organs((20, 24, 28)), volume, CLASSES, node)), between)
    with pytest.raises(Cancelled):
        task.take()
    assert list(node.GetSegmentation().GetSegmentIDs()) == keep
    # a node created for the result goes too
    task = drive(steps.Task(sc.import_labels_steps(organs((20, 24, 28)), volume, CLASSES)), lambda t: t.cancel())
    with pytest.raises(Cancelled):
        task.take()
    assert scene.GetFirstNodeByName("CT SFR") is None


# ---------------------------------------------------------------------------------------------
# Copies out of the scene: bounded slabs


def progress_steps(task_messages):
    done = [int(m.group(1)) for m in (re.search(r"\((\d+)/\d+ slices\)", t) for t in task_messages) if m]
    return [b - a for a, b in zip([0] + done, done)]


def run_collecting(generator):
    task = steps.Task(generator)
    messages = []
    drive(task, lambda t: messages.append(t.message))
    return task, messages


def test_a_volume_is_copied_in_slabs_of_at_most_slice_bytes(scenes, monkeypatch):
    shape = (50, 40, 48)  # 3840 bytes per k-plane of int16
    monkeypatch.setattr(sc, "SLICE_BYTES", 4 * 3840 + 100)
    scene = scenes()
    image = np.random.default_rng(0).integers(-1000, 1000, size=shape, dtype=np.int16)
    volume = sc.add_volume(scene, image, M, "CT")
    task, messages = run_collecting(sc.volume_copy_steps(volume))
    array, m = task.take()
    assert np.array_equal(array, image) and np.allclose(m, M)
    sizes = progress_steps(messages)
    assert sum(sizes) == 50 and max(sizes) <= 4
    # the checks (the allocation runs on a helper thread), 13 slabs of <= 4 planes, the end checks
    assert task.slices == 1 + 13 + 1


def test_a_volume_changed_between_two_slabs_is_refused(scenes, monkeypatch):
    monkeypatch.setattr(sc, "SLICE_BYTES", 1)  # one k-plane per slice
    scene = scenes()
    volume = sc.add_volume(scene, phantom(0)[0], M, "CT")

    def replace(task):
        if "(3/" in task.message:
            sc.set_volume(volume, phantom(1)[0], M)

    task = drive(steps.Task(sc.volume_copy_steps(volume)), replace)
    with pytest.raises(InputError, match="'CT' changed while it was being read"):
        task.take()

    def modify(task):
        if "(3/" in task.message:
            volume.GetImageData().GetPointData().GetScalars().Modified()  # voxels changed in place

    task = drive(steps.Task(sc.volume_copy_steps(volume)), modify)
    with pytest.raises(InputError, match="changed while it was being read"):
        task.take()


# ---------------------------------------------------------------------------------------------
# Export of a labelled case: slices == Slicer's export


def labelled(scene, volume):
    """A segmentation with a shared multi-class layer, a second overlapping layer, an empty
    segment, and a segment partly outside the volume."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
    shape = sc.volume_array(volume, copy=False).shape
    sc.apply_labels(organs(shape), volume, CLASSES, node)
    over = np.zeros(shape, np.uint8)
    over[2:-2, 3:9, 4:-4] = 1  # overlaps the organs: the later segment wins
    sc.apply_labels(over, volume, {1: "vessel"}, node)
    node.GetSegmentation().AddEmptySegment("empty", "empty")
    return node


NAMES = ["liver", "spleen", "kidney", "Label_5 (SFR)", "aorta", "vessel", "empty"]


def test_export_in_slices_equals_slicers_export_on_the_volume_grid(scenes, monkeypatch):
    scene, volume = new_scene_with_volume(scenes, (30, 36, 40))
    node = labelled(scene, volume)
    segmentation = node.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs())
    lut = np.array([0] + [NAMES.index(segmentation.GetSegment(i).GetName()) + 1 for i in ids], dtype=np.uint8)
    reference = sc._export_with_slicer(volume, node, ids, lut, (30, 36, 40))

    def refuse(*a):
        raise AssertionError("Slicer's export was used")

    monkeypatch.setattr(sc, "_export_with_slicer", refuse)
    monkeypatch.setattr(sc, "SLICE_BYTES", 1)  # one k-plane per slice
    task, messages = run_collecting(sc.export_label_steps(volume, node, NAMES))
    label, missing = task.take()
    assert missing == [] and label.dtype == np.uint8
    assert np.array_equal(label, reference)
    assert set(np.unique(label)) == {0, 1, 2, 3, 4, 5, 6}
    assert max(progress_steps(messages)) <= 1


def test_export_on_a_shifted_grid_takes_the_slices_and_on_a_rotated_grid_slicers_export(scenes, monkeypatch):
    scene = scenes()
    shape = (24, 30, 34)
    first = sc.add_volume(scene, np.zeros(shape, np.int16), M, "first")
    node = labelled(scene, first)
    segmentation = node.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs())
    lut = np.array([0] + [NAMES.index(segmentation.GetSegment(i).GetName()) + 1 for i in ids], dtype=np.uint8)
    shifted_m = M.copy()
    shifted_m[:3, 3] += M[:3, :3] @ np.array([3, -2, 5])  # whole voxels: no resampling needed
    shifted = sc.add_volume(scene, np.zeros((20, 34, 30), np.int16), shifted_m, "shifted")
    rotated_m = oblique_matrix(spacing=(0.9, 1.1, 2.0), origin=(10.0, -28.0, 9.0))
    rotated_m[:3, :3] = sc.np.array(rotated_m[:3, :3]) @ np.array([[1, 0, 0], [0, np.cos(0.1), -np.sin(0.1)], [0, np.sin(0.1), np.cos(0.1)]])
    rotated = sc.add_volume(scene, np.zeros(shape, np.int16), rotated_m, "rotated")
    references = {v.GetName(): sc._export_with_slicer(v, node, ids, lut, sc.volume_array(v, copy=False).shape) for v in (shifted, rotated)}
    used = []
    real = sc._export_with_slicer
    monkeypatch.setattr(sc, "_export_with_slicer", lambda *a: used.append(a[0].GetName()) or real(*a))
    said = []
    for v in (shifted, rotated):
        label, _ = sc.steps.run(sc.export_label_steps(v, node, NAMES, on_resample=said.append))
        assert np.array_equal(label, references[v.GetName()]), v.GetName()
    assert used == ["rotated"]
    # The one long slice is announced (the panel's log), only where it happens.
    assert len(said) == 1 and "not on the grid of 'rotated'" in said[0] and "may pause" in said[0]
    assert references["shifted"].any() and references["rotated"].any()


def test_segments_changed_between_two_slices_of_an_export_are_refused(scenes, monkeypatch):
    monkeypatch.setattr(sc, "SLICE_BYTES", 1)
    scene, volume = new_scene_with_volume(scenes, (20, 24, 28))
    node = labelled(scene, volume)

    def paint(task):
        if "(2/" in task.message:
            node.GetSegmentation().RemoveSegment(node.GetSegmentation().GetNthSegmentID(0))

    task = drive(steps.Task(sc.export_label_steps(volume, node, NAMES)), paint)
    with pytest.raises(InputError, match="changed while they were being read"):
        task.take()


def test_training_collector_slices_are_bounded(scenes, monkeypatch):
    monkeypatch.setattr(sc, "SLICE_BYTES", 1)
    scene, volume = new_scene_with_volume(scenes, (20, 24, 28))
    node = labelled(scene, volume)
    other = sc.add_volume(scene, phantom(1)[0], M, "other")
    collector = sc.TrainingCollector([(volume, node)], [other], log=lambda m: None)
    messages = []
    task = collector._task
    drive(task, lambda t: messages.append(t.message))
    collector.step()  # finished: raises nothing
    assert collector.finished and collector.done == 2
    assert max(progress_steps(messages)) <= 1
    data = collector.builder()()
    assert data.counts() == (1, 1)
    assert np.array_equal(data.unlabeled[0].image, phantom(1)[0])


# ---------------------------------------------------------------------------------------------
# Undo: one segment per slice, same result as removing the segments one by one


def slicer_undo(record):
    """The reference: the undo as it was (RemoveSegment of each segment in one go)."""
    segmentation = record.segmentation_node.GetSegmentation()
    for segment_id in record.segment_ids:
        segmentation.RemoveSegment(segment_id)
    if record.created and segmentation.GetNumberOfSegments() == 0:
        record.segmentation_node.GetScene().RemoveNode(record.segmentation_node)


@pytest.mark.parametrize("part", ["whole result", "part of a shared layer"])
def test_undo_in_slices_equals_removing_the_segments(scenes, part):
    shape = (30, 36, 40)
    states, slices = [], []
    for mode in ("slicer", "slices"):
        scene, volume = new_scene_with_volume(scenes, shape)
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
        manual = np.zeros(shape, np.uint8)
        manual[3:20, 5:30, 10:40] = 1
        sc.apply_labels(manual, volume, {1: "liver"}, node)
        record = sc.apply_labels(organs(shape), volume, CLASSES, node)
        if part != "whole result":
            # Two of the five segments of one labelmap: the others keep their voxels there.
            record = sc.ApplyRecord(node, record.segment_ids[1:3], False)
        if mode == "slicer":
            slicer_undo(record)
        else:
            added_per_slice = []

            def between(task):
                added_per_slice.append(node.GetSegmentation().GetNumberOfSegments())

            task = drive(steps.Task(sc.undo_steps(record)), between)
            assert task.take() is True
            slices.append((task.slices, added_per_slice))
        states.append(state(node))
    assert_same_state(states[0], states[1])
    n = len(record.segment_ids)
    assert slices[0][0] == n  # one segment per slice
    assert slices[0][1] == list(range(1 + 5 - 1, 1 + 5 - n, -1)) if part == "whole result" else slices[0][1] == [5]
