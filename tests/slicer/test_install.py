"""The module's engine install (SFRSegmentationLib.install): pip's failure reaches the panel as a
message naming the source, the source defaults to a local wheel, and the installed package is
one of the places the tool and library are looked for. The real install of the built wheel into
a fresh environment, followed by a worker training through it, is scripts/test_wheel.sh."""
import os
import sys
import textwrap

import SFRSegmentationLib as sl
from SFRSegmentationLib import binding, install, worker


def test_a_wheel_that_is_not_there_fails_with_pips_message(tmp_path):
    missing = tmp_path / "sfr_segmentation-0.1.0-py3-none-manylinux_2_34_x86_64.whl"
    job = sl.EngineInstall(str(missing), pip_args=["--no-index"]).start()
    try:
        job.wait(300)
        raise AssertionError("a missing wheel installed")
    except RuntimeError as e:
        text = str(e)
    assert f"pip install {missing} failed" in text and "exit" in text, text
    assert job.poll()["finished"] and job.result is None


def test_cancel_stops_pip(tmp_path):
    # A "python" that never ends stands for a slow pip: cancel must end it and say so.
    slow = tmp_path / "slowpython"
    slow.write_text("#!/bin/sh\nexec sleep 600\n")
    slow.chmod(0o755)
    job = sl.EngineInstall("sfr-segmentation", python=str(slow)).start()
    job.cancel()
    try:
        job.wait(30)
        raise AssertionError("cancelled install finished")
    except sl.DownloadCancelled as e:
        assert "cancelled" in str(e)


def test_the_default_source_is_a_local_wheel_else_the_index(monkeypatch, tmp_path):
    module = tmp_path / "ext" / "SFRSegmentation"
    module.mkdir(parents=True)
    monkeypatch.setattr(install, "module_dir", lambda: module)
    assert sl.default_source() == "sfr-segmentation"
    (module / "wheels").mkdir()
    wheel = module / "wheels" / "sfr_segmentation-0.1.0-py3-none-manylinux_2_34_x86_64.whl"
    wheel.write_bytes(b"")
    assert sl.default_source() == str(wheel)


def test_an_installed_package_is_found_without_a_path(monkeypatch, tmp_path):
    # The installed package's layout (sfr/bin/sfr, sfr/lib/libsfr.so.0.1), with the real tool.
    site = tmp_path / "site"
    pkg = site / "sfr"
    (pkg / "bin").mkdir(parents=True)
    (pkg / "lib").mkdir()
    repo_python = os.path.join(os.path.dirname(__file__), "..", "..", "python", "sfr", "__init__.py")
    (pkg / "__init__.py").write_text(open(repo_python).read())
    cli = pkg / "bin" / "sfr"
    cli.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        exec "{os.environ.get('SFR_CLI')}" "$@"
        """))
    cli.chmod(0o755)
    (pkg / "lib" / "libsfr.so.0.1").write_bytes(b"")
    monkeypatch.syspath_prepend(str(site))
    sys.modules.pop("sfr", None)
    monkeypatch.delenv("SFR_CLI", raising=False)
    monkeypatch.delenv("SFR_LIBRARY", raising=False)
    engine = sl.installed_engine()
    assert engine == {"cli": cli, "library": pkg / "lib" / "libsfr.so.0.1"}
    assert worker.find_cli() == cli
    assert ("installed sfr-segmentation package", pkg / "lib" / "libsfr.so.0.1") in binding.candidate_paths()
    sys.modules.pop("sfr", None)
