"""Finding and loading libsfr: every path tried is named when it is missing or does not load;
the version is reported and checked; failing calls raise with the status and the library's
message; the stitching functions of the ABI."""
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import SFRSegmentationLib.binding as binding
from conftest import REPO, library_path, oblique_matrix
from SFRSegmentationLib import LibraryLoadError, SfrError, candidate_paths, load_library


@pytest.fixture
def empty_module_dir(tmp_path, monkeypatch):
    """Pretend the module lives in an empty folder, with no $SFR_LIBRARY, so that nothing is found
    by accident."""
    monkeypatch.delenv("SFR_LIBRARY", raising=False)
    fake = tmp_path / "slicer_module" / "SFRSegmentation"
    fake.mkdir(parents=True)
    monkeypatch.setattr(binding, "module_dir", lambda: fake)
    return fake


def test_missing_library_names_every_path_tried(empty_module_dir):
    with pytest.raises(LibraryLoadError) as e:
        load_library()
    msg = str(e.value)
    assert "was not found" in msg and "SFR_LIBRARY" in msg
    for origin, p in candidate_paths():
        assert str(p) in msg, f"{p} ({origin}) missing from:\n{msg}"
    assert str(empty_module_dir / "lib" / "libsfr.so") in msg


def test_a_given_path_that_points_nowhere_is_an_error_not_a_fallback(monkeypatch, tmp_path):
    """With a working library next to the module and in $SFR_LIBRARY, a setting that points
    nowhere must not quietly load one of them instead."""
    real = library_path()  # (reads $SFR_LIBRARY: before it is changed below)
    monkeypatch.setenv("SFR_LIBRARY", str(real))
    with pytest.raises(LibraryLoadError) as e:
        load_library(str(tmp_path / "setting" / "libsfr.so"))
    msg = str(e.value)
    assert "set in the module's Setup section points nowhere" in msg and str(tmp_path / "setting" / "libsfr.so") in msg
    assert str(real) not in msg  # not even tried
    monkeypatch.setenv("SFR_LIBRARY", str(tmp_path / "env" / "libsfr.so"))
    with pytest.raises(LibraryLoadError, match="environment variable SFR_LIBRARY points nowhere"):
        binding.find_library_path(None)
    # A folder that holds the library stands for it.
    monkeypatch.setenv("SFR_LIBRARY", str(real.parent))
    assert binding.find_library_path(None) == real


def test_search_order_setting_then_env_then_module(monkeypatch, tmp_path):
    monkeypatch.setenv("SFR_LIBRARY", str(tmp_path / "from-env"))
    (tmp_path / "from-env").mkdir()
    c = candidate_paths(str(tmp_path / "from-setting.so"))
    assert [o for o, _ in c[:3]] == ["setting", "$SFR_LIBRARY", "next to the module"]
    assert c[1][1] == tmp_path / "from-env" / "libsfr.so"  # a folder stands for the file in it


def test_unloadable_file_reports_the_os_error(empty_module_dir, tmp_path):
    bad = tmp_path / "libsfr.so"
    bad.write_bytes(b"this is not a shared object\n" * 100)
    with pytest.raises(LibraryLoadError) as e:
        load_library(str(bad))
    msg = str(e.value)
    assert str(bad) in msg and "could not be loaded" in msg and "libtorch" in msg
    # The operating system's own reason is kept.
    assert "invalid ELF header" in msg, msg


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the fake library")
def test_missing_dependency_is_named(empty_module_dir, tmp_path):
    """The real-world failure: the library exists but a library it links (libtorch) does not."""
    (tmp_path / "dep.c").write_text("int dep(void) { return 1; }\n")
    (tmp_path / "sfr.c").write_text("int dep(void); int sfr_x(void) { return dep(); }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "libtorch_fake.so"), str(tmp_path / "dep.c")], check=True)
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", str(tmp_path / "libsfr.so"), str(tmp_path / "sfr.c"), f"-L{tmp_path}", "-ltorch_fake"],
        check=True,
    )
    (tmp_path / "libtorch_fake.so").unlink()
    with pytest.raises(LibraryLoadError) as e:
        load_library(str(tmp_path / "libsfr.so"))
    assert "libtorch_fake.so: cannot open shared object file" in str(e.value), str(e.value)


def test_a_library_without_the_abi_is_named(empty_module_dir):
    other = Path(np.__file__).parent / "_core"
    so = next(iter(sorted(other.glob("_multiarray_umath*.so"))), None) or next(Path(np.__file__).parent.rglob("*.so"))
    with pytest.raises(LibraryLoadError, match="not a libsfr") as e:
        load_library(str(so))
    assert str(so) in str(e.value)


def test_version_is_reported_and_matches_cargo():
    lib = load_library(str(library_path()))
    cargo = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "Cargo.toml").read_text(), re.M).group(1)
    assert lib.version == cargo
    assert binding.version_is_compatible(lib.version_tuple)
    assert lib.path == library_path()
    assert not binding.version_is_compatible((0, 2, 0)) and not binding.version_is_compatible((1, 1, 0))


def test_errors_carry_status_name_and_library_message(tmp_path):
    lib = load_library(str(library_path()))
    missing = tmp_path / "nope.sfrmodel"
    handle = ctypes.c_void_p()
    with pytest.raises(SfrError) as e:
        lib.call("sfr_model_load", str(missing).encode(), b"cpu", ctypes.byref(handle))
    assert e.value.status == "SFR_ERR_IO", e.value
    assert "nope.sfrmodel" in e.value.detail
    assert not handle  # outputs are written only on success
    # A pointer the library did not hand out is refused, not dereferenced.
    bogus = ctypes.c_void_p(0x1000)
    from SFRSegmentationLib.binding import SfrProgress

    with pytest.raises(SfrError) as e:
        lib.call("sfr_job_poll", bogus, ctypes.byref(SfrProgress()))
    assert e.value.status == "SFR_ERR_BAD_HANDLE"


def test_stitching_round_trip_through_the_abi():
    lib = load_library(str(library_path()))
    assert lib.stitch_layout((112, 112, 80), 1024) == (9, 9)  # DESIGN.md's LA example
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(10, 12, 14)).astype(np.uint8)
    canvas = lib.stitch_labels(labels, oblique_matrix(), 128)
    assert canvas.shape == (128, 128) and (canvas == 255).any()  # padding is 255
    back = lib.unstitch_labels(canvas, labels.shape)
    assert np.array_equal(back, labels)
    image = lib.stitch_image(labels.astype(np.int16), oblique_matrix(), 128)
    assert image.dtype == np.float32 and image.shape == (128, 128)
    with pytest.raises(SfrError) as e:
        lib.stitch_layout((2000, 10, 10), 1024)
    assert e.value.status == "SFR_ERR_INVALID_ARGUMENT"
