"""Every process the project starts dies with the one that started it, however that one dies.

A SIGKILL runs no clean-up, so only what the kernel does on a death can end the children: these tests
kill a real `dinobridge index` (and a script mapping in a passing thread) mid-run and look, 5 s later,
for any process that descended from it while it ran.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# ordered_map called from a thread that is not the main one, so the fork server is not tied to the
# caller by the kernel: only the workers' pipe and multiprocessing's own watch can end the tree.
MAP_IN_A_THREAD = """
import threading, time
from bridge.decoding import ordered_map

def run():
    for _ in ordered_map(time.sleep, [(0.05,)] * 100_000, workers=2):
        print("mapped", flush=True)

if __name__ == "__main__":
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
"""


def start(command: list[str], output: Path) -> subprocess.Popen:
    """`command` running from the repository, its output to a file: not a pipe, which a surviving
    worker would hold open, hanging the test that reads it."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with output.open("w") as out:
        return subprocess.Popen(command, cwd=output.parent, env=environment, stdout=out, stderr=out)


def descendants_while_running(child: subprocess.Popen, timeout: float = 120) -> dict[psutil.Process, str]:
    """Every process descended from `child` and its command line, polled until two of them are not its
    own children (the decode workers, which the fork server forks). A psutil.Process keeps its start
    time, so a pid reused after its death is not mistaken for it."""
    seen: dict[psutil.Process, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        try:
            current = psutil.Process(child.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for process in current:
            if process not in seen:
                try:
                    seen[process] = " ".join(process.cmdline())
                except psutil.Error:
                    seen[process] = "?"
        if sum(p.ppid() != child.pid for p in current if running(p)) >= 2:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"the child never got going (exit {child.poll()}); its tree: {seen}")


def running(process: psutil.Process) -> bool:
    """Alive and not a zombie (a dead process its new parent has not reaped yet)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_alive(processes: dict[psutil.Process, str], wait: float) -> list[str]:
    """Those of `processes` still running after `wait` seconds (sooner once none is), each killed then,
    so the suite goes on clean."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(running(process) for process in processes):
        time.sleep(0.05)
    left = [f"{process.pid}: {name[:150]}" for process, name in processes.items() if running(process)]
    for process in processes:
        if running(process):
            process.kill()
    return left


def kill_and_wait(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_of_index_leaves_no_process_it_started(tmp_path: Path, tiny_bridge) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for number in range(400):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(folder / f"{number:03d}.jpg")
    tiny_bridge.save_pretrained(tmp_path / "model")
    command = [sys.executable, "-m", "bridge.cli", "index", str(folder), "--model", str(tmp_path / "model")]
    command += ["--out", str(tmp_path / "index"), "--workers", "2", "--batch-size", "2"]
    with start(command, tmp_path / "out.txt") as child:
        started = descendants_while_running(child)  # both decode workers are up: mid-run
        kill_and_wait(child)
    assert "unchanged" not in (tmp_path / "out.txt").read_text()  # killed before its summary
    names = list(started.values())
    assert any("forkserver" in name for name in names) and any("resource_tracker" in name for name in names)
    assert still_alive(started, wait=5) == []


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_workers_die_with_a_caller_that_mapped_in_a_passing_thread(tmp_path: Path) -> None:
    (tmp_path / "mapper.py").write_text(MAP_IN_A_THREAD)
    with start([sys.executable, str(tmp_path / "mapper.py")], tmp_path / "out.txt") as child:
        started = descendants_while_running(child)
        deadline = time.monotonic() + 60
        while "mapped" not in (tmp_path / "out.txt").read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        kill_and_wait(child)
    assert "mapped" in (tmp_path / "out.txt").read_text()  # killed while mapping
    assert len(started) >= 4  # the resource tracker, the fork server and two workers
    assert still_alive(started, wait=5) == []


def test_a_finished_map_leaves_no_worker_behind() -> None:
    from bridge.decoding import ordered_map

    results = [result for _, result in ordered_map(pow, [(n, 2) for n in range(40)], workers=2)]
    assert results == [n * n for n in range(40)]
    time.sleep(0.5)  # for the fork server to reap its workers
    forked = [p for p in psutil.Process().children(recursive=True) if running(p) and p.ppid() != os.getpid()]
    assert forked == []  # the fork server itself stays, for the next map
