"""Installing the SFR engine into Slicer's Python: the ``sfr-segmentation`` wheel, which holds
the ``sfr`` tool and libsfr and depends on ``torch==2.13.*`` (libtorch, found by the tool and the
library relative to themselves inside that Python's site-packages).

The install runs ``python -m pip install SOURCE`` with Slicer's own Python (PythonSlicer) — the
command ``slicer.util.pip_install`` runs — but in a child process watched from a helper thread,
so the panel shows pip's progress and can cancel, and Slicer's GUI never waits on it. SOURCE is a
local wheel file (one shipped beside the module, or the checkout's ``dist/``) or a requirement
for a package index. Afterwards the tool and library are found through the installed package
(``sfr.executable()``, ``sfr.library()``): no path to type.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from .binding import installed_engine, module_dir  # noqa: F401  (installed_engine: re-exported)
from .download import Download
from .worker import cli_version

PACKAGE = "sfr-segmentation"
WHEEL_PATTERN = "sfr_segmentation-*.whl"
# Asked of the Python that installed the package: where its tool and library are.
_WHERE = "import json, sfr; print(json.dumps({'cli': sfr.executable(), 'library': sfr.library()}))"


def local_wheels() -> List[Path]:
    """Wheels of the engine found without a package index, newest first: a ``wheels`` folder
    beside the module (an extension package can ship one there), then a source checkout's
    ``dist/`` (what ``scripts/wheel.sh`` writes)."""
    here = module_dir()
    found: List[Path] = []
    for folder in (here / "wheels", here.parent.parent / "dist"):
        if folder.is_dir():
            found += sorted(folder.glob(WHEEL_PATTERN), key=lambda p: p.stat().st_mtime, reverse=True)
    return found


def default_source() -> str:
    """What "Install SFR" installs when the user names nothing: a local wheel, else the package
    from the configured index."""
    wheels = local_wheels()
    return str(wheels[0]) if wheels else PACKAGE


class EngineInstall(Download):
    """``start()`` installs ``source`` with ``python -m pip install`` in a child process;
    ``poll()`` -> dict(finished, error, stage, done, total); ``cancel()`` kills pip;
    ``wait()`` -> {"cli": Path, "library": Path} of the installed engine, checked to run
    (``sfr --version`` of a supported version)."""

    def __init__(self, source: Optional[str] = None, python: Optional[str] = None, pip_args=(), timeout: float = 3600.0):
        self.source = source or default_source()
        super().__init__(f"pip:{self.source}", Path(self.source))
        self.python = python or sys.executable
        self.pip_args = list(pip_args)
        self.timeout = timeout
        self.stage = "starting"
        self.output: List[str] = []
        self.result: Optional[dict] = None

    def poll(self) -> dict:
        p = super().poll()
        p["stage"] = self.stage
        return p

    def wait(self, timeout: Optional[float] = None) -> dict:
        super().wait(timeout)
        return self.result

    def _pip(self) -> None:
        argv = [self.python, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
                self.source] + self.pip_args

        def on_line(line: str) -> None:
            self.output.append(line)
            # pip's own steps ("Processing ...", "Collecting torch==2.13.0", "Installing
            # collected packages: ...") are the progress a user can read.
            if not line.startswith(" "):
                self.stage = line[:200]

        returncode, _ = self._watch(argv, "the SFR install was cancelled (pip was stopped; run it again to finish)", on_line)
        if returncode != 0:
            tail = "\n".join(self.output[-25:])
            raise RuntimeError(f"pip install {self.source} failed (exit {returncode}):\n{tail}")

    def _run(self) -> None:
        error = None
        try:
            self.stage = f"pip install {self.source}"
            self._pip()
            self.stage = "checking the installed tool"
            out = subprocess.run([self.python, "-c", _WHERE], capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise RuntimeError(f"pip installed {self.source}, but its package does not import: {out.stderr.strip()[-1500:]}")
            where = json.loads(out.stdout.strip().splitlines()[-1])
            version = cli_version(Path(where["cli"]))
            self.result = {"cli": Path(where["cli"]), "library": Path(where["library"]), "version": version}
            self.stage = f"SFR {version} installed"
        except Exception as e:  # pip, the check and the tool's own errors all reach the panel's message
            error = str(e)
        with self._lock:
            self._error = error
            self._finished = True
