"""The module's scene code (SFRSegmentationLib/scene.py) against Slicer's real MRML classes, from
the slicer-core package (Slicer's MRML and Segmentations libraries, headless, no Qt):
vtkMRMLScene, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode,
vtkSlicerSegmentationsModuleLogic. Oblique and anisotropic volumes, transformed volumes
refused, multi-class results, re-segmentation into an existing node, existing segments
untouched, class names and colours, undo, and Close Scene."""
import numpy as np
import pytest

slicer = pytest.importorskip(
    "slicer",
    reason="slicer-core is not installed: run scripts/setup.sh (it installs slicer-core into the cached venv)",
)
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here has no MRML classes (not slicer-core)", allow_module_level=True)

from conftest import SHAPE, oblique_matrix, phantom  # noqa: E402
from SFRSegmentationLib import InputError, ijk_to_ras_to_lps_geometry, nifti  # noqa: E402
from SFRSegmentationLib import scene as sc  # noqa: E402

M = oblique_matrix()  # rotated about two axes, spacing (0.9, 1.1, 2.0)
CLASSES = {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def multi_class(seed=0, shape=SHAPE):
    """Three non-overlapping off-centre blocks (classes 1..3), so a flip or transposition of any
    axis moves them."""
    lab = np.zeros(shape, dtype=np.uint8)
    lab[2:8, 3:10, 4:15] = 1
    lab[10:17, 12:20, 5:9] = 2
    lab[4:9, 15:22, 18:26] = 3
    return lab


def node_count(scene):
    # The subject hierarchy node is created lazily by the scene on first use (in Slicer it
    # always exists): not ours, not counted.
    return scene.GetNumberOfNodes() - scene.GetNumberOfNodesByClass("vtkMRMLSubjectHierarchyNode")


def segment_mask(seg_node, segment_id, volume_node):
    """One segment read back on a volume's grid through Slicer's own export."""
    scene = volume_node.GetScene()
    tmp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "readback")
    try:
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg_node, [segment_id], tmp, volume_node)
        return sc.volume_array(tmp) > 0
    finally:
        sc._remove_with_display(scene, tmp, set())


# ---------------------------------------------------------------------------------------------
# Volumes


def test_oblique_anisotropic_volume_gives_its_voxels_and_matrix(scene):
    image, _ = phantom(0)
    node = sc.add_volume(scene, image, M, "oblique")
    array, m = sc.volume_array_and_matrix(node)
    assert array.shape == SHAPE and array.dtype == image.dtype
    assert np.array_equal(array, image)
    assert np.allclose(m, M, atol=1e-12)
    # Slicer's own view of the node agrees with our LPS conversion of its matrix.
    g = ijk_to_ras_to_lps_geometry(m)
    assert np.allclose(node.GetSpacing(), g.spacing, atol=1e-12)
    assert np.allclose(node.GetSpacing(), (0.9, 1.1, 2.0), atol=1e-12)
    assert np.allclose(np.diag([-1, -1, 1]) @ np.array(node.GetOrigin()), g.origin, atol=1e-12)
    # A copy: the scene's volume can change while the job reads the array.
    array[0, 0, 0] += 1
    assert sc.volume_array(node)[0, 0, 0] == image[0, 0, 0]


def test_volume_under_a_transform_is_refused(scene):
    node = sc.add_volume(scene, phantom(0)[0], M, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(InputError, match="under a transform.*harden"):
        sc.volume_array_and_matrix(node)
    with pytest.raises(InputError, match="under a transform"):
        sc.apply_labels(multi_class(), node, CLASSES)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.SetAndObserveTransformNodeID(transform.GetID())
    plain = sc.add_volume(scene, phantom(1)[0], M, "plain")
    with pytest.raises(InputError, match="'seg' is under a transform"):
        sc.apply_labels(multi_class(), plain, CLASSES, seg)
    with pytest.raises(InputError, match="under a transform"):
        sc.export_label(plain, seg, ["liver"])


def test_vector_volume_and_empty_volume_are_refused(scene):
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = sc.vtk.vtkImageData()
    image.SetDimensions(4, 5, 6)
    image.AllocateScalars(sc.vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(image)
    with pytest.raises(InputError, match="3 components.*scalar volume"):
        sc.volume_array_and_matrix(rgb)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxels"):
        sc.volume_array_and_matrix(empty)


# ---------------------------------------------------------------------------------------------
# Results into segmentations


def test_multi_class_result_lands_on_the_volume_grid_with_names_and_colours(scene):
    image, _ = phantom(0)
    volume = sc.add_volume(scene, image, M, "CT")
    labels = multi_class()
    before = node_count(scene)
    record = sc.apply_labels(labels, volume, CLASSES)
    node = record.segmentation_node
    assert record.created and node.GetName() == "CT SFR"
    # Only the segmentation node (and its display node) entered the scene: no temporary nodes.
    assert node_count(scene) - before <= 3, [scene.GetNthNode(i).GetClassName() for i in range(before, node_count(scene))]
    seg = node.GetSegmentation()
    assert [seg.GetSegment(s).GetName() for s in record.segment_ids] == ["liver", "spleen", "kidney"]
    for c, segment_id in zip((1, 2, 3), record.segment_ids):
        assert np.array_equal(segment_mask(node, segment_id, volume), labels == c), f"class {c} moved"
    colors = [tuple(round(x * 255) for x in seg.GetSegment(s).GetColor()) for s in record.segment_ids]
    assert colors == [sc.PALETTE[0], sc.PALETTE[1], sc.PALETTE[2]]
    # The whole label map back through our own export (names -> values) is the input.
    back, missing = sc.export_label(volume, node, ["liver", "spleen", "kidney"])
    assert missing == [] and back.dtype == np.uint8 and np.array_equal(back, labels)
    # Class order of another model: values follow the names given.
    back, _ = sc.export_label(volume, node, ["kidney", "liver", "spleen"])
    assert np.array_equal(back, np.array([0, 2, 3, 1], dtype=np.uint8)[labels])


def test_class_colours_come_from_the_scene_colour_table(scene):
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "GenericAnatomyColors")
    table.SetTypeToUser()
    table.SetNumberOfColors(3)
    table.SetColor(0, "background", 0, 0, 0, 0)
    table.SetColor(1, "tissue", 0.5, 0.5, 0.5, 1)
    table.SetColor(2, "liver", 0.87, 0.51, 0.40, 1)
    volume = sc.add_volume(scene, phantom(0)[0], M, "CT")
    record = sc.apply_labels(multi_class(), volume, {0: "background", 1: "Liver", 2: "organ X", 3: "kidney"})
    seg = record.segmentation_node.GetSegmentation()
    got = {seg.GetSegment(s).GetName(): seg.GetSegment(s).GetColor() for s in record.segment_ids}
    assert got["Liver"] == pytest.approx((0.87, 0.51, 0.40), abs=1 / 255)  # by name, any case (8-bit table)
    assert got["organ X"] == pytest.approx(tuple(x / 255 for x in sc.PALETTE[1]))


def test_resegmentation_into_an_existing_node_leaves_its_segments_untouched(scene):
    image, _ = phantom(3)
    volume = sc.add_volume(scene, image, M, "MR")
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    manual = np.zeros(SHAPE, dtype=np.uint8)
    manual[5:12, 5:15, 10:20] = 1  # overlaps the classes below
    first = sc.apply_labels(manual, volume, {0: "background", 1: "liver"}, output)
    manual_id = first.segment_ids[0]
    manual_color = output.GetSegmentation().GetSegment(manual_id).GetColor()
    manual_before = segment_mask(output, manual_id, volume)
    assert np.array_equal(manual_before, manual == 1)

    labels = multi_class()
    second = sc.apply_labels(labels, volume, CLASSES, output)
    third = sc.apply_labels(labels, volume, CLASSES, output)
    assert not second.created and second.segmentation_node is output
    seg = output.GetSegmentation()
    assert seg.GetNumberOfSegments() == 7
    assert [second.names[s] for s in second.segment_ids] == ["liver (SFR)", "spleen", "kidney"]
    assert [third.names[s] for s in third.segment_ids] == ["liver (SFR 2)", "spleen (SFR)", "kidney (SFR)"]
    # The manual segment: same voxels, same name, same colour.
    assert np.array_equal(segment_mask(output, manual_id, volume), manual_before)
    assert seg.GetSegment(manual_id).GetName() == "liver"
    assert seg.GetSegment(manual_id).GetColor() == manual_color
    # A new segment of an existing name takes that segment's colour.
    assert seg.GetSegment(second.segment_ids[0]).GetColor() == pytest.approx(manual_color)
    for c, segment_id in zip((1, 2, 3), third.segment_ids):
        assert np.array_equal(segment_mask(output, segment_id, volume), labels == c)

    # Undo removes exactly the last result, then the one before; the manual segment stays.
    assert sc.undo(third)
    assert sorted(seg.GetSegmentIDs()) == sorted([manual_id] + second.segment_ids)
    assert sc.undo(second)
    assert list(seg.GetSegmentIDs()) == [manual_id]
    assert not sc.undo(second)  # nothing left of it
    assert output.GetScene() is not None  # not created by us: never removed
    assert np.array_equal(segment_mask(output, manual_id, volume), manual_before)


def test_result_on_another_grid_is_resampled_into_the_existing_node(scene):
    """An existing segmentation keeps its own geometry: a result on a volume whose grid is the
    first one shifted by two voxels along i lands two voxels further along i."""
    first = sc.add_volume(scene, phantom(0)[0], M, "first")
    shifted_m = M.copy()
    shifted_m[:3, 3] += 2 * M[:3, 0]  # origin moved by two voxels along the (oblique) i axis
    second = sc.add_volume(scene, phantom(1)[0], shifted_m, "second")
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    block = np.zeros(SHAPE, dtype=np.uint8)
    block[3:6, 4:9, 5:12] = 1
    sc.apply_labels(block, first, {0: "background", 1: "a"}, output)  # output takes first's grid
    record = sc.apply_labels(block, second, {0: "background", 1: "b"}, output)
    on_first = segment_mask(output, record.segment_ids[0], first)
    expected = np.zeros(SHAPE, dtype=bool)
    expected[3:6, 4:9, 7:14] = True
    assert np.array_equal(on_first, expected)


def test_empty_result_creates_nothing_and_bad_labels_are_refused(scene):
    volume = sc.add_volume(scene, phantom(0)[0], M, "CT")
    n = node_count(scene)
    record = sc.apply_labels(np.zeros(SHAPE, np.uint8), volume, CLASSES)
    assert record.segment_ids == [] and record.segmentation_node is None and node_count(scene) == n
    assert not sc.undo(record)
    with pytest.raises(InputError, match=r"do not fit 'CT'"):
        sc.apply_labels(np.zeros((2, 3, 4), np.uint8), volume, CLASSES)
    with pytest.raises(InputError, match="non-negative integers"):
        sc.apply_labels(multi_class().astype(np.float32), volume, CLASSES)


def test_undo_of_a_created_node_removes_it_unless_the_user_added_to_it(scene):
    volume = sc.add_volume(scene, phantom(0)[0], M, "CT")
    record = sc.apply_labels(multi_class(), volume, CLASSES)
    node = record.segmentation_node
    assert sc.undo(record) and node.GetScene() is None
    record = sc.apply_labels(multi_class(), volume, CLASSES)
    node = record.segmentation_node
    node.GetSegmentation().AddEmptySegment("mine", "mine")
    assert sc.undo(record)
    assert node.GetScene() is not None and list(node.GetSegmentation().GetSegmentIDs()) == ["mine"]


def test_output_default_is_the_result_node_of_this_volume_only(scene):
    a = sc.add_volume(scene, phantom(0)[0], M, "A")
    b = sc.add_volume(scene, phantom(1)[0], M, "B")
    assert sc.result_node_for(a) is None
    result_a = sc.apply_labels(multi_class(), a, CLASSES).segmentation_node
    assert sc.result_node_for(a) is result_a
    # The next volume gets no default: its labels must not land in "A SFR".
    assert sc.result_node_for(b) is None
    manual = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    sc.apply_labels(multi_class(), b, CLASSES, manual)
    assert sc.result_node_for(b) is None  # a node the user chose is not "B's result"
    scene.RemoveNode(a)
    assert sc.result_node_for(a) is None


# ---------------------------------------------------------------------------------------------
# Close Scene


def test_close_scene_forgets_pairs_results_and_undo_even_when_ids_are_reused(scene):
    image, label = phantom(0)
    volume = sc.add_volume(scene, image, M, "case1")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "case1 seg")
    record = sc.apply_labels(label, volume, {0: "background", 1: "blob"}, seg)
    pairs = sc.LabeledPairs()
    assert pairs.add(volume, seg) and not pairs.add(volume, seg)
    old_ids = (volume.GetID(), seg.GetID())

    scene.Clear(0)  # what File > Close Scene does
    assert volume.GetScene() is None and not sc.in_scene(volume)
    new_volume = sc.add_volume(scene, phantom(5)[0], M, "other")
    new_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other seg")
    keep = sc.apply_labels(label, new_volume, {0: "background", 1: "keep"}, new_seg).segment_ids
    assert (new_volume.GetID(), new_seg.GetID()) == old_ids  # the IDs are reused: an ID-based pair would attach here

    assert pairs.pairs() == [] and len(pairs) == 0
    assert not sc.undo(record)
    assert list(new_seg.GetSegmentation().GetSegmentIDs()) == keep
    # A segmentation that finishes after the close has nowhere to go: refused, not misplaced.
    with pytest.raises(InputError, match="removed from the scene.*discarded"):
        sc.apply_labels(label, volume, {0: "background", 1: "blob"})
    with pytest.raises(InputError, match="removed from the scene"):
        sc.apply_labels(label, new_volume, {0: "background", 1: "blob"}, seg)
    with pytest.raises(InputError, match="no longer in the scene"):
        sc.volume_array_and_matrix(volume)


def test_removed_nodes_drop_out_of_the_pairs(scene):
    pairs = sc.LabeledPairs()
    nodes = []
    for n in range(3):
        v = sc.add_volume(scene, phantom(n)[0], M, f"v{n}")
        s = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"s{n}")
        pairs.add(v, s)
        nodes.append((v, s))
    scene.RemoveNode(nodes[1][1])
    assert [v.GetName() for v, _ in pairs.pairs()] == ["v0", "v2"]
    pairs.remove([0])
    assert [v.GetName() for v, _ in pairs.pairs()] == ["v2"]


# ---------------------------------------------------------------------------------------------
# Training data from the scene


def test_training_collector_exports_each_case_on_its_own_grid(scene, tmp_path):
    pairs = []
    truths = []
    for seed, matrix in ((0, M), (1, oblique_matrix(spacing=(1.3, 0.7, 3.0), origin=(-4.0, 2.0, 50.0)))):
        image, label = phantom(seed)
        v = sc.add_volume(scene, image, matrix, f"labelled{seed}")
        s = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"labels{seed}")
        sc.apply_labels(label, v, {0: "background", 1: "blob"}, s)
        if seed == 0:
            extra = np.zeros(SHAPE, np.uint8)
            extra[0:2, 0:3, 0:4] = 1
            sc.apply_labels(extra, v, {0: "background", 1: "vessel"}, s)
        pairs.append((v, s))
        truths.append((image, label, matrix))
    unl = sc.add_volume(scene, phantom(2)[0], M, "unlabelled")
    folder = tmp_path / "more"
    folder.mkdir()
    nifti.write(folder / "a.nii.gz", phantom(3)[0], M)
    # NRRD and MHA: written by Slicer's own writer, read back by Slicer's reader on a helper
    # thread into a node outside the scene.
    files = {"b.nrrd": (phantom(4)[0], oblique_matrix(spacing=(0.7, 0.8, 2.5))), "c.mha": (phantom(5)[0].astype(np.float32), M)}
    for name, (image, matrix) in files.items():
        tmp = sc.add_volume(scene, image, matrix, "to write")
        writer = slicer.vtkMRMLVolumeArchetypeStorageNode()
        writer.SetFileName(str(folder / name))
        assert writer.WriteData(tmp)
        scene.RemoveNode(tmp)
    (folder / "notes.txt").write_text("not a volume")
    n = node_count(scene)
    nodes_added = []
    scene.AddObserver(scene.NodeAddedEvent, lambda *a: nodes_added.append(a))
    logged = []
    # 'labels1' has no "vessel": counted as background only because the caller chose it.
    with pytest.raises(InputError, match="'labels1' on 'labelled1' has no segment for class 'vessel'"):
        sc.TrainingCollector(pairs, [unl, pairs[0][0]], str(folder), log=logged.append)
    collector = sc.TrainingCollector(pairs, [unl, pairs[0][0]], str(folder), log=logged.append, missing="background")
    assert collector.class_names == ["blob", "vessel"] and collector.total == 6
    while collector.step():  # one GUI-thread slice per call (returns at once while a helper thread works)
        pass
    assert collector.finished and collector.done == collector.total == 6
    assert nodes_added == [], "a node entered the scene"
    assert node_count(scene) == n, "temporary nodes were left in the scene"
    assert any("'labels1' on 'labelled1' has no segment 'vessel': counted as background" in line for line in logged), logged
    data = collector.result()
    assert data.classes == {0: "background", 1: "blob", 2: "vessel"}
    assert data.counts() == (2, 4)
    for case, (image, label, matrix) in zip(data.labeled, truths):
        assert np.array_equal(case.image, image) and np.allclose(case.ijk_to_ras, matrix, atol=1e-12)
        expected = label.copy()
        if case is data.labeled[0]:
            expected[0:2, 0:3, 0:4] = 2
        assert np.array_equal(case.label, expected)
    assert data.unlabeled[0].case_id.startswith("unlabelled [")
    for case, (name, (image, matrix)) in zip(data.unlabeled[2:4], files.items()):
        assert case.case_id.endswith(name) and case.image.dtype == image.dtype
        assert np.array_equal(case.image, image) and np.allclose(case.ijk_to_ras, matrix, atol=1e-5)
    assert data.unlabeled[1].case_id.endswith("a.nii.gz")  # the folder's files in name order
    assert np.allclose(data.unlabeled[1].ijk_to_ras, M, atol=1e-4)  # read from the NIfTI file


def test_training_collector_refuses_what_cannot_train(scene, tmp_path):
    with pytest.raises(InputError, match="at least one labelled case"):
        sc.TrainingCollector([], [])
    v = sc.add_volume(scene, phantom(0)[0], M, "v")
    s = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    with pytest.raises(InputError, match="no segments"):
        sc.TrainingCollector([(v, s)])
    sc.apply_labels(phantom(0)[1], v, {0: "background", 1: "blob"}, s)
    (tmp_path / "x.nrrd").write_bytes(b"NRRD0004\n")
    with pytest.raises(InputError, match="x.nrrd: Slicer could not read this volume file"):
        sc.TrainingCollector([(v, s)], folder=str(tmp_path)).run()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no volume file"):
        sc.TrainingCollector([(v, s)], folder=str(empty))


def test_copying_a_volume_that_cannot_fit_is_refused(scene, monkeypatch):
    import SFRSegmentationLib.inputs as inputs

    volume = sc.add_volume(scene, phantom(0)[0], M, "big one")
    monkeypatch.setattr(inputs, "available_memory_bytes", lambda: 100)
    with pytest.raises(InputError, match="copying 'big one' needs about .* GB of memory, but only 0.0 GB is available"):
        sc.volume_array_and_matrix(volume)
    assert sc.volume_array(volume, copy=False).shape == SHAPE  # a view needs no memory


class FakeDicomDatabase:
    """Slicer's ctkDICOMDatabase as the module uses it: instance UID -> file -> tag value."""

    def __init__(self, modality_of_uid):
        self.modality_of_uid = modality_of_uid

    def fileForInstance(self, uid):
        return f"/dicom/{uid}.dcm" if uid in self.modality_of_uid else ""

    def fileValue(self, path, tag):
        assert tag == "0008,0060", tag
        return self.modality_of_uid[path[len("/dicom/"):-len(".dcm")]]


def test_intensities_follow_the_labelled_images_dicom_modality(scene):
    from SFRSegmentationLib import dicom_modality, resolve_normalization

    image, _ = phantom(1)
    ct = sc.add_volume(scene, image, np.eye(4), "ct")
    ct.SetAttribute("DICOM.instanceUIDs", "1.2.3.1 1.2.3.2")
    mr = sc.add_volume(scene, image, np.eye(4), "mr")
    mr.SetAttribute("DICOM.instanceUIDs", "1.2.9.1")
    plain = sc.add_volume(scene, image, np.eye(4), "from a NIfTI file")
    db = FakeDicomDatabase({"1.2.3.1": "CT", "1.2.9.1": "MR"})
    assert [dicom_modality(n, db) for n in (ct, mr, plain)] == ["CT", "MR", None]
    assert dicom_modality(ct, None) is None  # no DICOM database in this Slicer
    assert dicom_modality(ct, FakeDicomDatabase({})) is None  # files gone from the database

    # Automatic: CT only when every labelled image is a DICOM CT; unknown stays the library's
    # "auto" (z-score, with its warning when the voxels look like Hounsfield units).
    assert resolve_normalization("auto", ["CT", "CT"])[0] == "ct"
    assert resolve_normalization("auto", ["MR"])[0] == "zscore"
    choice, why = resolve_normalization("auto", ["CT", None])
    assert choice == "auto" and "mixed or partly unknown" in why
    assert resolve_normalization("auto", [None, None])[0] == "auto"
    # An explicit choice wins over the modality.
    assert resolve_normalization("zscore", ["CT"])[0] == "zscore"
    assert resolve_normalization("ct", [None])[0] == "ct"
    with pytest.raises(InputError, match="minmax"):
        resolve_normalization("minmax", ["CT"])
