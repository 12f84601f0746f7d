"""pipeline.lock: one writer per store, exercised with real processes.

Child processes load ``pipeline.lock`` without running the ``regcore``/``pipeline`` package
``__init__`` files (those import torch, zarr and dask, seconds per process); the lock module itself
needs only the standard library and ``regcore.errors``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline.lock import LOCK_NAME, StoreLock, StoreLockedError, force_unlock, read_lock
from regcore.errors import InfrastructureError, InputError

ROOT = Path(__file__).resolve().parents[1]

BOOT = textwrap.dedent(f"""
    import os, sys, time, types
    for _name in ("regcore", "pipeline"):
        _m = types.ModuleType(_name)
        _m.__path__ = [os.path.join({str(ROOT)!r}, _name)]
        sys.modules[_name] = _m
    from pipeline.lock import StoreLock, StoreLockedError
""")

# holds the lock until a line arrives on stdin, then releases it ("release") or dies without ("crash")
HOLDER = """
store, heartbeat, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
lock = StoreLock(store, heartbeat_s=heartbeat, stale_after_s=max(5.0, 10 * heartbeat))
lock.acquire()
print("ACQUIRED", os.getpid(), flush=True)
sys.stdin.readline()
if mode == "crash":
    os._exit(0)
lock.release()
print("RELEASED", flush=True)
"""

# waits for the start file, tries the lock; a winner holds it until a line arrives on stdin
RACER = """
store, go = sys.argv[1], sys.argv[2]
print("READY", flush=True)
while not os.path.exists(go):
    time.sleep(0.0005)
try:
    lock = StoreLock(store)
    lock.acquire()
except StoreLockedError as exc:
    print("LOCKED", (exc.owner or {}).get("pid"), str(exc).replace(chr(10), " "), flush=True)
    sys.exit(0)
print("ACQUIRED", os.getpid(), flush=True)
sys.stdin.readline()
lock.release()
"""


class Child:
    """A ``python -c`` child process whose stdout lines are read with a timeout."""

    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BOOT + textwrap.dedent(code), *map(str, args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.pid = self.proc.pid
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 10.0) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"child {self.pid} printed nothing in {timeout} s; "
                                 f"stderr: {self.proc.stderr.read()}") from None

    def send(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 10.0) -> str:
        """Wait for exit; return stderr (asserting a clean exit)."""
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        rc = self.proc.wait(timeout=timeout)
        err = self.proc.stderr.read()
        assert rc == 0, err
        return err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def children():
    started: list[Child] = []

    def start(code: str, *args: str) -> Child:
        child = Child(code, *args)
        started.append(child)
        return child

    yield start
    for child in started:
        child.kill()


def dead_pid() -> int:
    """The pid of a process that has exited."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def write_lock(store: Path, **fields) -> dict:
    record = {"version": 1, "host": "elsewhere", "pid": 12345, "started": "2024-01-01T00:00:00+00:00",
              "heartbeat": time.time(), "token": "f" * 32, "command": "cohortreg run elsewhere"}
    record.update(fields)
    store.mkdir(parents=True, exist_ok=True)
    (store / LOCK_NAME).write_text(json.dumps(record))
    return record


def race(children, store: Path, go: Path, n: int) -> tuple[Child, list[str]]:
    """Start ``n`` racers, release them together; return the winner and the losers' lines."""
    racers = [children(RACER, store, go) for _ in range(n)]
    for r in racers:
        assert r.line() == "READY"
    go.touch()
    results = {r.pid: r.line() for r in racers}
    winners = [r for r in racers if results[r.pid].startswith("ACQUIRED")]
    assert len(winners) == 1, results
    winner = winners[0]
    assert results[winner.pid] == f"ACQUIRED {winner.pid}"
    assert read_lock(store)["pid"] == winner.pid
    losers = [line for pid, line in results.items() if pid != winner.pid]
    for line in losers:
        assert line.startswith(f"LOCKED {winner.pid} "), line
        assert f"pid {winner.pid}" in line and "--force-unlock" in line
    for r in racers:
        r.finish()
    assert not (store / LOCK_NAME).exists()
    return winner, losers


@pytest.mark.parametrize("round_", range(3))
def test_two_processes_race_exactly_one_wins(tmp_path, children, round_):
    store = tmp_path / "new" / "store.zarr"        # does not exist yet: the lock creates it
    race(children, store, tmp_path / "go", 2)
    assert store.is_dir()


def test_racing_takeover_of_a_stale_lock_has_one_winner(tmp_path, children):
    store = tmp_path / "store"
    write_lock(store, heartbeat=time.time() - 3600)
    race(children, store, tmp_path / "go", 4)
    leftovers = sorted(p.name for p in store.iterdir())
    assert leftovers == [], leftovers              # no temp, break or set-aside files remain


def test_live_holder_blocks_until_it_exits(tmp_path, children):
    store = tmp_path / "store"
    holder = children(HOLDER, store, 10.0, "release")
    assert holder.line() == f"ACQUIRED {holder.pid}"
    t0 = time.monotonic()
    with pytest.raises(StoreLockedError) as info:
        StoreLock(store).acquire()
    assert time.monotonic() - t0 < 1.0             # refused at once, no waiting
    message = str(info.value)
    assert f"pid {holder.pid}" in message and socket.gethostname() in message
    assert "last heartbeat" in message and "started" in message and "--force-unlock" in message
    assert info.value.owner["pid"] == holder.pid
    assert isinstance(info.value, InfrastructureError)
    holder.send()
    assert holder.line() == "RELEASED"
    holder.finish()
    assert not (store / LOCK_NAME).exists()
    with StoreLock(store) as lock:
        assert lock.held and read_lock(store)["pid"] == os.getpid()
    assert not (store / LOCK_NAME).exists()


@pytest.mark.parametrize("death", ["exit_without_release", "sigkill"])
def test_lock_of_a_dead_process_is_taken_over(tmp_path, children, caplog, death):
    store = tmp_path / "store"
    holder = children(HOLDER, store, 10.0, "crash")
    assert holder.line() == f"ACQUIRED {holder.pid}"
    if death == "sigkill":
        holder.proc.send_signal(signal.SIGKILL)
    else:
        holder.send()
    holder.proc.wait(timeout=10)
    assert read_lock(store)["pid"] == holder.pid   # left behind
    with caplog.at_level(logging.WARNING, logger="pipeline.lock"):
        with StoreLock(store) as lock:
            assert read_lock(store)["pid"] == os.getpid()
            assert read_lock(store)["token"] == lock.record["token"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stale" in m and str(holder.pid) in m and "gone" in m for m in warnings), warnings


def test_other_host_old_heartbeat_taken_over_fresh_one_respected(tmp_path, caplog):
    store = tmp_path / "store"
    pid = dead_pid()                               # pid liveness is not judged for other hosts
    write_lock(store, pid=pid, heartbeat=time.time() - 5)
    with pytest.raises(StoreLockedError) as info:
        StoreLock(store, stale_after_s=60).acquire()
    assert "host elsewhere" in str(info.value) and f"pid {pid}" in str(info.value)
    assert read_lock(store)["host"] == "elsewhere"

    write_lock(store, pid=pid, heartbeat=time.time() - 3600)
    with caplog.at_level(logging.WARNING, logger="pipeline.lock"):
        with StoreLock(store, stale_after_s=60):
            assert read_lock(store)["pid"] == os.getpid()
    assert any("stale" in r.getMessage() and "elsewhere" in r.getMessage() for r in caplog.records)


def test_unreadable_lock_respected_while_recent_taken_over_when_old(tmp_path, caplog):
    store = tmp_path / "store"
    store.mkdir()
    path = store / LOCK_NAME
    path.write_bytes(b"\x00not json")
    with pytest.raises(StoreLockedError, match="unreadable"):
        StoreLock(store, stale_after_s=60).acquire()
    assert read_lock(store)["unreadable"] is True
    old = time.time() - 3600
    os.utime(path, (old, old))
    with caplog.at_level(logging.WARNING, logger="pipeline.lock"):
        with StoreLock(store, stale_after_s=60):
            assert read_lock(store)["pid"] == os.getpid()
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_heartbeat_advances_and_stops_on_release(tmp_path):
    store = tmp_path / "store"
    lock = StoreLock(store, heartbeat_s=0.1, stale_after_s=5)
    record = lock.acquire()
    first = read_lock(store)["heartbeat"]
    assert first == record["heartbeat"]
    time.sleep(0.45)
    later = read_lock(store)
    assert later["heartbeat"] > first + 0.15
    assert later["token"] == record["token"] and later["started"] == record["started"]
    thread = lock._thread
    lock.release()
    assert not thread.is_alive() and not lock.held
    assert not (store / LOCK_NAME).exists()
    assert sorted(p.name for p in store.iterdir()) == []
    lock.release()                                 # idempotent


def test_force_unlock_removes_a_live_lock_and_returns_its_owner(tmp_path, children):
    store = tmp_path / "store"
    assert force_unlock(store) is None and read_lock(store) is None
    holder = children(HOLDER, store, 0.1, "release")
    assert holder.line() == f"ACQUIRED {holder.pid}"
    owner = force_unlock(store)
    assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
    assert not (store / LOCK_NAME).exists()
    with StoreLock(store) as lock:
        time.sleep(0.35)                           # the holder's heartbeat notices the loss
        holder.send()
        assert holder.line() == "RELEASED"
        err = holder.finish()
        assert "lost the lock" in err
        # the old holder's release left our lock alone
        assert read_lock(store)["token"] == lock.record["token"]
    assert read_lock(store) is None


def test_arguments_and_reentry(tmp_path):
    with pytest.raises(InputError):
        StoreLock(tmp_path, heartbeat_s=0)
    with pytest.raises(InputError):
        StoreLock(tmp_path, heartbeat_s=10, stale_after_s=5)
    with pytest.raises(ValueError), StoreLock(tmp_path / "s") as lock:
        with pytest.raises(StoreLockedError):      # same process, second lock object: refused
            StoreLock(tmp_path / "s").acquire()
        with pytest.raises(RuntimeError):
            lock.acquire()
        raise ValueError("boom")
    assert read_lock(tmp_path / "s") is None       # released on the way out of an exception
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InfrastructureError, match="cannot lock store"):
        StoreLock(blocker / "store").acquire()


def test_takeover_never_removes_a_lock_that_replaced_the_stale_one(tmp_path):
    """The window the real race can hit only rarely, made deterministic: the stale lock we judged is
    replaced by a fresh one before we break it; a takeover in progress elsewhere blocks ours; a
    break file abandoned by a crashed process is cleared."""
    from pipeline.lock import BREAK_NAME, _snapshot

    store = tmp_path / "store"
    lock = StoreLock(store, stale_after_s=60)
    write_lock(store, heartbeat=time.time() - 3600)
    seen = _snapshot(store / LOCK_NAME)
    assert lock._stale_reason(seen) is not None
    fresh = write_lock(store, token="a" * 32)      # someone else took over meanwhile
    assert lock._break(seen) is False
    assert read_lock(store) == fresh
    assert sorted(p.name for p in store.iterdir()) == [LOCK_NAME]

    write_lock(store, heartbeat=time.time() - 3600)
    seen = _snapshot(store / LOCK_NAME)
    (store / BREAK_NAME).write_text("{}")          # a takeover in progress elsewhere
    assert lock._break(seen) is False and read_lock(store)["host"] == "elsewhere"
    old = time.time() - 3600
    os.utime(store / BREAK_NAME, (old, old))       # ... abandoned: cleared, then ours goes through
    assert lock._break(seen) is False and not (store / BREAK_NAME).exists()
    assert lock._break(seen) is True and read_lock(store) is None
