"""extmind.procs.stop_process on real processes: SIGTERM within the grace, SIGKILL after it, by
Popen or by pid, and a whole process group (its zombies not counted)."""

from __future__ import annotations

import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from extmind.procs import free_ports, group_alive, stop_process

IGNORES_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)


def _ready(cmd: str, **kw) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", cmd], stdout=subprocess.PIPE, text=True, **kw)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigterm_is_enough_for_a_process_that_obeys_it():
    proc = subprocess.Popen(["sleep", "60"])
    t0 = time.monotonic()
    assert stop_process(proc, 10) == -signal.SIGTERM
    assert time.monotonic() - t0 < 5
    assert stop_process(proc, 10) == -signal.SIGTERM  # already stopped: its exit code again


def test_sigkill_after_the_grace():
    proc = _ready(IGNORES_TERM)
    t0 = time.monotonic()
    assert stop_process(proc, 0.5) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - t0 < 10


def test_zero_grace_kills_at_once():
    proc = _ready(IGNORES_TERM)
    assert stop_process(proc, 0) == -signal.SIGKILL


def test_by_pid():
    obeys = subprocess.Popen(["sleep", "60"])
    assert stop_process(obeys.pid, 10) == 0
    ignores = _ready(IGNORES_TERM)
    assert stop_process(ignores.pid, 0.5) == -signal.SIGKILL
    assert obeys.wait(5) == -signal.SIGTERM and ignores.wait(5) == -signal.SIGKILL
    assert stop_process(obeys.pid, 1) is None  # gone (and reaped): nothing to stop


def test_group_takes_the_children_too():
    # The leader starts a child that ignores SIGTERM and outlives it.
    cmd = (
        f"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', {IGNORES_TERM!r}], "
        "stdout=subprocess.PIPE); child.stdout.readline(); print('ready', flush=True); time.sleep(60)"
    )
    proc = _ready(cmd, start_new_session=True)
    assert group_alive(proc.pid)
    assert stop_process(proc, 0.5, group=True) == -signal.SIGTERM
    assert not group_alive(proc.pid)


def _zombie(proc: subprocess.Popen) -> None:
    """Waits until ``proc`` has exited but is not reaped (we never wait for it before)."""
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are told apart through /proc (Linux)")
def test_a_group_left_with_only_a_zombie_is_gone():
    """A service that exited but was not reaped yet (its parent, init, reaps when it gets to it)
    has nothing left to stop: ``down`` does not wait for the reaping."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    _zombie(proc)
    assert not group_alive(proc.pid)
    assert stop_process(proc.pid, 5, group=True) is None  # nothing live to stop: no grace spent
    assert proc.wait(5) == 0


# A child in the leader's group that ignores SIGTERM and names itself with bytes that are not
# UTF-8 (the kernel keeps 15 bytes of a name: a cut multi-byte character does this too); the
# leader exits once it is ready.
WEIRD_CHILD = (
    "import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', "
    "'import ctypes, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "ctypes.CDLL(None).prctl(15, bytes([99, 97, 99, 104, 195]), 0, 0, 0); print(1, flush=True); time.sleep(60)'], "
    "stdout=subprocess.PIPE); child.stdout.readline()"
)
# Its main thread exits while another thread runs: /proc shows the process as a zombie.
MAIN_THREAD_EXITS = (
    "import ctypes, platform, threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); "
    "ctypes.CDLL(None).syscall({'x86_64': 60, 'aarch64': 93}[platform.machine()], 0)"
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are told apart through /proc (Linux)")
def test_a_zombie_leader_with_a_live_member_is_alive():
    """Only zombies count as gone: a member with a name that is not UTF-8 is live, and stopping the
    group takes it (SIGKILL after the grace)."""
    leader = subprocess.Popen([sys.executable, "-c", WEIRD_CHILD], start_new_session=True)
    _zombie(leader)
    assert group_alive(leader.pid)
    assert stop_process(leader.pid, 0.3, group=True) == -signal.SIGKILL
    assert not group_alive(leader.pid)
    leader.wait(5)


@pytest.mark.skipif(
    not Path("/proc/self/stat").exists() or platform.machine() not in ("x86_64", "aarch64"),
    reason="a main thread's own exit through syscall(2): Linux on x86_64 / aarch64",
)
def test_a_zombie_whose_threads_still_run_is_alive():
    leader = subprocess.Popen([sys.executable, "-c", MAIN_THREAD_EXITS], start_new_session=True)
    _zombie(leader)
    assert group_alive(leader.pid)
    assert stop_process(leader.pid, 5, group=True) == 0  # SIGTERM ends the whole process
    assert leader.wait(5) == -signal.SIGTERM


def test_free_ports_are_distinct_and_free():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
