"""The module's state in a parameter node (issue 35, item 7), with the real MRML scene: values
and labelled cases set and read back, a removed node dropping only its own pair, and the
whole state saved with the scene and loaded back."""
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed: run scripts/setup.sh")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here has no MRML classes (not slicer-core)", allow_module_level=True)

from conftest import oblique_matrix, phantom  # noqa: E402
from SFRSegmentationLib import InputError, default_preset  # noqa: E402
from SFRSegmentationLib import scene as sc  # noqa: E402
from SFRSegmentationLib.parameters import SFRParameters  # noqa: E402

M = oblique_matrix()


def cases(scene, n):
    out = []
    for k in range(n):
        v = sc.add_volume(scene, phantom(k)[0], M, f"vol{k}")
        s = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"seg{k}")
        out.append((v, s))
    return out


def test_values_defaults_and_the_singleton():
    scene = slicer.vtkMRMLScene()
    p = SFRParameters.of_scene(scene)
    assert SFRParameters.of_scene(scene).node is p.node  # one per scene
    assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    assert (p.method, p.preset, p.use_sam, p.missing_as_background) == ("mean-teacher", default_preset(), True, False)
    p.method, p.preset, p.use_sam, p.missing_as_background = "acmt", "cpu-lora", False, True
    assert (p.method, p.preset, p.use_sam, p.missing_as_background) == ("acmt", "cpu-lora", False, True)
    with pytest.raises(InputError, match="preset must be one of"):
        p.preset = "gpu-huge"
    assert p.preset == "cpu-lora"
    assert p.normalization == "auto"
    p.normalization = "ct"
    assert p.normalization == "ct"
    with pytest.raises(InputError, match="normalization must be one of"):
        p.normalization = "minmax"


def test_cases_as_node_references_survive_removals():
    scene = slicer.vtkMRMLScene()
    p = SFRParameters.of_scene(scene)
    c = cases(scene, 3)
    for v, s in c:
        assert p.add(v, s)
    assert not p.add(*c[0])  # no duplicate
    assert p.pairs() == c and len(p) == 3
    scene.RemoveNode(c[1][0])  # the middle case's volume is deleted
    assert p.pairs() == [c[0], c[2]]  # only that pair is gone; the others keep their partners
    p.remove([0])
    assert p.pairs() == [c[2]]
    p.set_unlabeled([c[0][0]])
    assert p.unlabeled() == [c[0][0]]
    p.clear()
    assert p.pairs() == []


def test_the_state_is_saved_with_the_scene(tmp_path):
    scene = slicer.vtkMRMLScene()
    p = SFRParameters.of_scene(scene)
    c = cases(scene, 2)
    for v, s in c:
        p.add(v, s)
    p.set_unlabeled([sc.add_volume(scene, phantom(5)[0], M, "unl")])
    p.preset, p.method, p.unlabeled_folder = "cpu-lora", "supervised", "/data/more"
    path = tmp_path / "scene.mrml"
    scene.SetURL(str(path))
    assert scene.Commit()

    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(path))
    assert loaded.Connect()
    q = SFRParameters.of_scene(loaded)
    assert loaded.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1  # the saved one, not a new one
    assert (q.preset, q.method, q.unlabeled_folder) == ("cpu-lora", "supervised", "/data/more")
    assert [(v.GetName(), s.GetName()) for v, s in q.pairs()] == [("vol0", "seg0"), ("vol1", "seg1")]
    assert [v.GetName() for v in q.unlabeled()] == ["unl"]
    # Close Scene removes it with everything else; the next scene starts from the defaults.
    loaded.Clear(0)
    r = SFRParameters.of_scene(loaded)
    assert r.pairs() == [] and r.preset == default_preset()
