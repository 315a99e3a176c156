"""Downloading the official SAM ViT-B checkpoint once into a cache folder, on a background
thread with progress and cancellation (the module polls it from a QTimer, like training).

The file is written as ``NAME.partial`` and renamed only after its MD5 matches the published
one, so an interrupted or corrupted download never passes for a checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import threading
import urllib.request
from pathlib import Path
from typing import Optional

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
