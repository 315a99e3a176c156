"""Class mapping before training (SFRSegmentationLib/classes.py through scene.class_mapping and
TrainingCollector), with real segmentation nodes of slicer-core: "Liver" and "liver" are one
class, terminology codes match, a case missing a class's segment is an error naming the case
and the class unless the caller chose "treat as background"."""
import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed: run scripts/setup.sh")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here has no MRML classes (not slicer-core)", allow_module_level=True)

from conftest import SHAPE, oblique_matrix, phantom  # noqa: E402
from SFRSegmentationLib import InputError, classes  # noqa: E402
from SFRSegmentationLib import scene as sc  # noqa: E402

M = oblique_matrix()
LIVER = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
TISSUE = classes.Terminology(classes.GENERIC_CATEGORY, classes.GENERIC_TISSUE).entry()
KIDNEY_LEFT = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^"
KIDNEY_RIGHT = KIDNEY_LEFT.replace("SCT^7771000^Left", "SCT^24028007^Right")


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def case(scene, n, segments):
    """A volume and a segmentation whose segments are ``[(name, terminology, label mask)]``."""
    image, blob = phantom(n)
    volume = sc.add_volume(scene, image, M, f"vol{n}")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"seg{n}")
    for k, (name, term, mask) in enumerate(segments):
        record = sc.apply_labels(mask.astype(np.uint8), volume, {1: name}, node)
        segment = node.GetSegmentation().GetSegment(record.segment_ids[0])
        segment.SetName(name)  # exactly as given (apply_labels makes names unique)
        if term:
            sc.set_segment_terminology(segment, term)
    return volume, node


def masks():
    a = np.zeros(SHAPE, bool)
    a[2:8, 3:10, 4:12] = True
    b = np.zeros(SHAPE, bool)
    b[10:15, 12:20, 14:24] = True
    return a, b


def test_names_match_trimmed_and_without_case(scene):
    a, b = masks()
    pairs = [case(scene, 0, [("Liver", "", a), ("spleen", "", b)]),
             case(scene, 1, [(" liver ", "", a), ("SPLEEN", "", b)])]
    mapping = sc.class_mapping(pairs)
    assert mapping.class_names == ["Liver", "spleen"]
    assert mapping.classes[0].spellings == ["Liver", "liver"]
    assert any("'Liver', 'liver'" in n for n in mapping.notes())
    collector = sc.TrainingCollector(pairs, [], log=lambda m: None).run()
    data = collector.builder()()
    assert data.classes == {0: "background", 1: "Liver", 2: "spleen"}
    for c in data.labeled:
        expected = np.zeros(SHAPE, np.uint8)
        expected[a], expected[b] = 1, 2
        assert np.array_equal(c.label, expected)


def test_a_missing_segment_is_an_error_naming_case_and_class(scene):
    a, b = masks()
    pairs = [case(scene, 0, [("liver", "", a), ("spleen", "", b)]), case(scene, 1, [("Liver", "", a)])]
    with pytest.raises(InputError, match=r"labelled case 'seg1' on 'vol1' has no segment for class 'spleen'"):
        sc.class_mapping(pairs)
    with pytest.raises(InputError, match="no segment for class 'spleen'"):
        sc.TrainingCollector(pairs, [], log=lambda m: None)
    # The explicit choice: the case counts the class as background, and the log says so.
    logged = []
    collector = sc.TrainingCollector(pairs, [], log=logged.append, missing="background").run()
    assert any("'seg1' on 'vol1' has no segment 'spleen': counted as background" in m for m in logged), logged
    data = collector.builder()()
    assert data.classes == {0: "background", 1: "liver", 2: "spleen"}
    assert set(np.unique(data.labeled[1].label)) == {0, 1}
    # An empty segment is the explicit way to say "absent in this case": no error.
    v, s = pairs[1]
    sid = s.GetSegmentation().AddEmptySegment("", "Spleen")
    assert sid
    mapping = sc.class_mapping(pairs)
    assert mapping.cases[1].missing == [] and mapping.cases[1].segment_classes[sid] == 2


def test_terminology_codes_match_and_conflict(scene):
    a, b = masks()
    # Different names, same specific code: one class, which keeps the code.
    pairs = [case(scene, 0, [("Liver", LIVER, a)]), case(scene, 1, [("Hepar", LIVER, a)])]
    mapping = sc.class_mapping(pairs)
    assert mapping.class_names == ["Liver"] and mapping.classes[0].terminology.type[1] == "10200004"
    assert mapping.terminology() == {"Liver": classes.Terminology.parse(LIVER).entry()}
    # Slicer's default "Tissue" code says nothing: different names stay different classes.
    scene.Clear(1)
    pairs = [case(scene, 0, [("liver", TISSUE, a), ("spleen", TISSUE, b)]), case(scene, 1, [("Liver", TISSUE, a), ("Spleen", "", b)])]
    assert sc.class_mapping(pairs).class_names == ["liver", "spleen"]
    # Modifiers count: left and right kidney are two classes.
    scene.Clear(1)
    pairs = [case(scene, 0, [("kidney L", KIDNEY_LEFT, a), ("kidney R", KIDNEY_RIGHT, b)]),
             case(scene, 1, [("Left kidney", KIDNEY_LEFT, a), ("Right kidney", KIDNEY_RIGHT, b)])]
    assert sc.class_mapping(pairs).class_names == ["kidney L", "kidney R"]
    # One name, two different codes in two cases: refused, naming both.
    scene.Clear(1)
    pairs = [case(scene, 0, [("kidney", KIDNEY_LEFT, a)]), case(scene, 1, [("Kidney", KIDNEY_RIGHT, a)])]
    with pytest.raises(InputError, match=r"segment 'kidney' of 'seg0' on 'vol0' and segment 'Kidney' of 'seg1' on 'vol1'.*different terminology"):
        sc.class_mapping(pairs)


def test_segment_added_after_the_mapping_stops_the_gathering(scene):
    a, b = masks()
    pairs = [case(scene, 0, [("liver", "", a)])]
    collector = sc.TrainingCollector(pairs, [], log=lambda m: None)
    pairs[0][1].GetSegmentation().AddEmptySegment("", "late")
    with pytest.raises(InputError, match="'late' was added .* after the classes were decided"):
        collector.run()


def test_terminology_parse_round_trip():
    t = classes.Terminology.parse(KIDNEY_LEFT)
    assert t.specific and t.type == ("SCT", "64033007", "Kidney") and t.type_modifier[2] == "Left"
    assert classes.Terminology.parse(t.entry()) == t
    assert not classes.Terminology.parse(TISSUE).specific
    assert classes.Terminology.parse("") is None and classes.Terminology.parse("a~b") is None
    with pytest.raises(ValueError):
        classes.map_classes([("c", [classes.SegmentInfo("s", "x")])], missing="ignore")


def test_result_segments_carry_terminology(scene, tmp_path):
    a, b = masks()
    pairs = [case(scene, 0, [("Liver", LIVER, a), ("spleen", "", b)])]
    mapping = sc.class_mapping(pairs)
    volume = pairs[0][0]
    labels = np.zeros(SHAPE, np.uint8)
    labels[a], labels[b] = 1, 2
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    record = sc.apply_labels(labels, volume, mapping.training_classes(), out, mapping.terminology())
    seg = out.GetSegmentation()
    liver, spleen = (seg.GetSegment(s) for s in record.segment_ids)
    # The coded class keeps its code; the other gets Slicer's generic "Tissue" (and its name).
    assert classes.Terminology.parse(sc.segment_terminology(liver)).type == ("SCT", "10200004", "Liver")
    t = classes.Terminology.parse(sc.segment_terminology(spleen))
    assert t.type[:2] == ("SCT", "85756007") and spleen.GetName() == "spleen"
    # The registry keeps the terminology beside a model and reads it back.
    from SFRSegmentationLib import registry

    model = tmp_path / "m.sfrmodel"
    model.write_bytes(b"")
    registry.terminology_path(model).write_text('{"Liver": "%s"}' % LIVER)
    assert registry.ModelEntry("m", model).terminology == {"Liver": LIVER}
    assert registry.ModelEntry("n", tmp_path / "n.sfrmodel").terminology == {}
