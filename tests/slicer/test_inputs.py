"""Inputs are checked, with messages naming the case and the problem, before any library call;
and the module's Python never imports Slicer, VTK or Qt in its logic."""
import ast
import py_compile
import sys

import numpy as np
import pytest

from conftest import MODULE_DIR, oblique_matrix, phantom
from SFRSegmentationLib import InputError, SFRLogic, TrainingData, available_memory_bytes, build_config, check_memory, torch_already_loaded

M = oblique_matrix()


def data():
    return TrainingData({0: "background", 1: "blob"})


def test_label_shape_must_match_image():
    img, lab = phantom(0)
    with pytest.raises(InputError, match=r"labelled case 'liver1': label shape \(20, 24, 27\) differs from image shape \(20, 24, 28\)"):
        data().add_labeled(img, lab[:, :, :27], M, case_id="liver1")


def test_label_geometry_must_match_image():
    img, lab = phantom(0)
    shifted = M.copy()
    shifted[0, 3] += 5.0
    with pytest.raises(InputError, match="geometry differs from the image's"):
        data().add_labeled(img, lab, M, label_ijk_to_ras=shifted)
    # Rounding noise (float32 storage) is not a mismatch.
    noisy = M + 1e-7
    noisy[3] = [0, 0, 0, 1]
    data().add_labeled(img, lab, M, label_ijk_to_ras=noisy)


def test_arrays_must_be_3d():
    img, lab = phantom(0)
    with pytest.raises(InputError, match="expected a 3D array.*2 dimensions"):
        data().add_unlabeled(img[0], M)
    with pytest.raises(InputError, match="vector or RGB"):
        data().add_unlabeled(np.stack([img, img, img], axis=-1), M)
    with pytest.raises(InputError, match="label must be a 3D array"):
        data().add_labeled(img, lab[0], M)


def test_label_values_must_be_declared_classes():
    img, lab = phantom(0)
    with pytest.raises(InputError, match=r"label values span 0\.\.3, outside the classes 0\.\.1"):
        data().add_labeled(img, lab * 3, M)
    with pytest.raises(InputError, match="non-integer"):
        data().add_labeled(img, lab * 0.5, M)
    with pytest.raises(InputError, match="empty"):
        data().add_labeled(img, np.zeros_like(lab), M)


def test_bad_images_and_matrices():
    img, lab = phantom(0)
    f = img.astype(np.float32)
    f[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        data().add_unlabeled(f, M)
    sheared = M.copy()
    sheared[0, 1] += 0.3
    with pytest.raises(InputError, match="not orthogonal"):
        data().add_unlabeled(img, sheared)
    with pytest.raises(InputError, match="4x4"):
        data().add_unlabeled(img, M[:3])


def test_classes_and_case_ids():
    with pytest.raises(InputError, match="background"):
        TrainingData({1: "liver"})
    with pytest.raises(InputError, match="foreground"):
        TrainingData({0: "background"})
    assert TrainingData(["background", "liver", "tumour"]).classes == {0: "background", 1: "liver", 2: "tumour"}
    d = data()
    img, lab = phantom(0)
    assert d.add_labeled(img, lab, M) == "labeled_001"
    assert d.add_unlabeled(img, M) == "unlabeled_001"
    with pytest.raises(InputError, match="used twice"):
        d.add_unlabeled(img, M, case_id="labeled_001")
    assert d.counts() == (1, 1)


def test_training_needs_a_labelled_case():
    d = data()
    d.add_unlabeled(phantom(0)[0], M)
    # Refused before the library is even looked for.
    logic = SFRLogic(library_path="/nonexistent/libsfr.so", mode="in-process", cli_path="/nonexistent/sfr")
    with pytest.raises(InputError, match="no labelled case"):
        logic.start_training(d, preset="test-tiny")


def test_build_config():
    assert build_config(None, "test-tiny", "acmt") == {"preset": "test-tiny", "method": "acmt"}
    assert build_config({"vnet": {"iterations": 5}}, use_sam=False, device="cpu") == {"vnet": {"iterations": 5}, "sfr": False, "device": "cpu"}
    with pytest.raises(InputError, match="does not exist"):
        build_config(None, "cpu-small", sam_checkpoint="/nonexistent/sam_vit_b_01ec64.pth")
    with pytest.raises(InputError, match="full config"):
        build_config({"version": 1}, "cpu-small")
    assert build_config(None, "cpu-small", normalization="ct") == {"preset": "cpu-small", "normalization": "ct"}
    with pytest.raises(InputError, match="hounsfield"):
        build_config(None, "cpu-small", normalization="hounsfield")


def test_worker_process_is_the_default_and_auto_is_gone(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", object())
    assert SFRLogic().mode == "worker"
    monkeypatch.delitem(sys.modules, "torch")
    assert not torch_already_loaded()
    # Without torch the old "auto" loaded libsfr in-process; a saved "auto" now means the worker.
    assert SFRLogic().mode == "worker" and SFRLogic(mode="auto").mode == "worker"
    assert SFRLogic(mode="in-process").mode == "in-process"
    with pytest.raises(ValueError):
        SFRLogic(mode="threads")


def _libsfr_mapped_after(code: str) -> int:
    """Runs `code` in a fresh Python and counts libsfr/libtorch mappings of that process."""
    import subprocess

    from conftest import library_path

    prog = (
        f"import sys; sys.path.insert(0, {str(MODULE_DIR)!r})\n"
        "import SFRSegmentationLib as s\n"
        f"LIB = {str(library_path())!r}\n" + code + "\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(sum(1 for l in maps.splitlines() if 'libsfr' in l or 'libtorch' in l))\n"
    )
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


def test_opening_the_panel_loads_no_library():
    """What the panel does when it opens (create the logic, describe it) maps neither libsfr nor
    libtorch into the process, in either mode; only an explicit check (or a job) in in-process
    mode loads them."""
    assert _libsfr_mapped_after("l = s.SFRLogic(library_path=LIB); l.describe()") == 0
    assert _libsfr_mapped_after("l = s.SFRLogic(library_path=LIB, mode='in-process'); d = l.describe(); assert d['version'] is None") == 0
    assert _libsfr_mapped_after("l = s.SFRLogic(library_path=LIB, mode='in-process'); l.check()") > 0


def test_memory_check_refuses_before_allocating():
    check_memory(10, "x", available=100)
    with pytest.raises(InputError, match=r"training on 3 volumes needs about 2\.0 GB of memory, but only 1\.0 GB is available: use the worker"):
        check_memory(2_000_000_000, "training on 3 volumes", "use the worker", available=1_000_000_000)
    assert available_memory_bytes() is None or available_memory_bytes() > 0


def test_lib_imports_no_slicer_vtk_or_qt():
    """Only scene.py touches Slicer, and only its MRML classes (no Qt): importing the package
    imports none of them."""
    forbidden = {"slicer", "vtk", "qt", "ctk", "PythonQt", "torch"}
    for path in (MODULE_DIR / "SFRSegmentationLib").glob("*.py"):
        allowed = {"slicer", "vtk"} if path.name == "scene.py" else set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                assert top not in forbidden - allowed, f"{path.name} imports {n}"
    import subprocess

    code = f"import sys; sys.path.insert(0, {str(MODULE_DIR)!r}); import SFRSegmentationLib; print(sorted(m for m in ('slicer', 'vtk', 'qt') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_module_file_compiles(tmp_path):
    py_compile.compile(str(MODULE_DIR / "SFRSegmentation.py"), cfile=str(tmp_path / "m.pyc"), doraise=True)


def test_download_checks_md5_and_keeps_nothing_on_failure(tmp_path):
    """The SAM download's mechanics, offline (file:// URL): MD5 verified before the file
    appears; a wrong MD5 or a cancel leaves no file and no .partial."""
    import hashlib

    from SFRSegmentationLib import Download, DownloadCancelled
    from SFRSegmentationLib.download import SAM_VIT_B_MD5, SAM_VIT_B_URL

    assert SAM_VIT_B_URL.endswith("/sam_vit_b_01ec64.pth") and SAM_VIT_B_MD5.startswith("01ec64")
    src = tmp_path / "src.bin"
    src.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    ok = Download(src.as_uri(), tmp_path / "cache" / "ok.pth", md5).start()
    assert ok.wait(30) == tmp_path / "cache" / "ok.pth"
    assert (tmp_path / "cache" / "ok.pth").read_bytes() == src.read_bytes()
    p = ok.poll()
    assert p["finished"] and p["error"] is None and p["done"] == 3 << 20
    bad = Download(src.as_uri(), tmp_path / "cache" / "bad.pth", "0" * 32).start()
    with pytest.raises(RuntimeError, match="MD5"):
        bad.wait(30)
    cancelled = Download(src.as_uri(), tmp_path / "cache" / "c.pth", md5)
    cancelled.cancel()
    cancelled.start()
    with pytest.raises(DownloadCancelled):
        cancelled.wait(30)
    assert sorted(f.name for f in (tmp_path / "cache").iterdir()) == ["ok.pth"]


def test_class_indices_have_no_gaps():
    with pytest.raises(InputError, match="without gaps"):
        TrainingData({0: "background", 2: "tumour"})


def test_ui_file_has_every_widget_the_module_uses():
    """The widget code and the .ui file agree (a typo would only show up inside Slicer)."""
    import re
    import xml.etree.ElementTree as ET

    ui = ET.parse(MODULE_DIR / "Resources" / "UI" / "SFRSegmentation.ui")
    names = {w.get("name") for w in ui.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE_DIR / "SFRSegmentation.py").read_text()))
    assert used and used <= names, f"missing in the .ui: {sorted(used - names)}"


def test_the_default_preset_follows_the_cpu():
    import SFRSegmentationLib as sl
    from SFRSegmentationLib import logic

    assert sl.default_preset(bf16=True) == "cpu-lora"
    assert sl.default_preset(bf16=False) == "cpu-small"
    # This machine's own answer is the same function of its flags.
    assert sl.default_preset() == ("cpu-lora" if logic.cpu_has_avx512_bf16() else "cpu-small")
    assert "below" in sl.preset_expected_time("cpu-small")
