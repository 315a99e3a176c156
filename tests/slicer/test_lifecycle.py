"""The worker's lifecycle (issue 35, item 3): the worker process ends when the process that
started it (Slicer) ends, even by SIGKILL; job folders left by a dead owner are removed; and
closing an in-process job that is still running never blocks the caller."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import MODULE_DIR, cli_path, library_path, run_to_end, training_data  # noqa: F401
from SFRSegmentationLib import jobs, worker

HERE = Path(__file__).resolve().parent


def _state(pid: int):
    """The process's state letter from /proc, None when it no longer exists."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _children(pid: int):
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _gone(pid: int) -> bool:
    return _state(pid) in (None, "Z", "X")  # a zombie has ended; only its parent's reaping is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's (prctl); elsewhere the atexit handler ends workers")
def test_the_worker_dies_with_its_parent_killed_by_sigkill(tmp_path):
    assert worker.DIES_WITH_PARENT
    # The parent stands for Slicer: it starts a training job in a worker process (the real sfr
    # tool), prints the worker's pid, and waits.
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{str(MODULE_DIR)!r}, {str(HERE)!r}]
        from conftest import training_data
        import SFRSegmentationLib as sl
        logic = sl.SFRLogic(mode="worker", cli_path={str(cli_path())!r}, work_root={str(tmp_path / "work")!r})
        job = logic.start_training(training_data(), preset="cpu-small")
        while job._proc is None:
            assert not job.poll()["finished"], job.poll()
            time.sleep(0.05)
        print(job._proc.proc.pid, flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the parent printed {line!r} (exit {parent.poll()})"
        pid = int(line)
        time.sleep(1.0)  # the worker is running its job (it may have started threads or children)
        assert _state(pid) not in (None, "Z"), "the worker ended before its parent was killed"
        family = [pid] + _children(pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        t0 = time.time()
        while not all(_gone(p) for p in family) and time.time() - t0 < 5:
            time.sleep(0.05)
        alive = [p for p in family if not _gone(p)]
        for p in alive:
            os.kill(p, signal.SIGKILL)
        assert not alive, f"still running 5 s after their parent was killed: {alive}"
    finally:
        if parent.poll() is None:
            parent.kill()
    # What the killed parent left behind is removed by the next session.
    left = [d for d in (tmp_path / "work").iterdir() if d.name.startswith("sfr-")]
    assert left, "the job folder should still be there (its owner was killed)"
    removed = worker.remove_stale_folders(tmp_path / "work")
    assert sorted(removed) == sorted(left) and not any((tmp_path / "work").iterdir())


def test_stale_folders_of_live_owners_are_kept(tmp_path):
    mine = worker.make_temp_dir("sfr-train-", str(tmp_path))
    dead = worker.make_temp_dir("sfr-segment-", str(tmp_path))
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    (dead / worker.OWNER_FILE).write_text(str(p.pid))  # a process that has ended
    foreign = tmp_path / "sfr-train-someone"
    foreign.mkdir()  # no owner file: not ours to judge
    other = tmp_path / "unrelated"
    other.mkdir()
    assert worker.remove_stale_folders(tmp_path) == [dead]
    assert mine.is_dir() and foreign.is_dir() and other.is_dir() and not dead.exists()


def test_closing_a_running_in_process_job_never_blocks(native_logic):
    job = native_logic.start_training(training_data(), preset="cpu-small")
    t0 = time.time()
    while job.poll()["stage"] in ("prepare", "starting") and time.time() - t0 < 120:
        time.sleep(0.05)
    assert not job.poll()["finished"]
    t0 = time.perf_counter()
    closer = jobs.close_in_background(job)
    assert time.perf_counter() - t0 < 0.2, "closing a running job blocked the caller"
    closer.join(120)
    assert not closer.is_alive(), "the job did not end within 2 minutes of being cancelled"
    assert job.poll()["finished"]
