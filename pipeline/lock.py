"""One writer per store: the ``STORE/run.lock`` file that a ``cohortreg run`` holds while it writes.

The lock file is JSON (one record, see :func:`read_lock`)::

    {"version": 1, "host": "node07", "pid": 4242, "started": "2024-05-01T12:00:00+00:00",
     "heartbeat": 1714564800.25, "token": "9f1c...", "command": "cohortreg run STORE ..."}

Protocol (local file systems and NFS; only ``os.link``, ``os.rename``, ``os.replace`` and
``O_EXCL`` are relied on, no ``flock``):

* **Create**: the full record is written to a private temporary file that is then ``os.link``-ed to
  ``run.lock``; ``link`` fails when the name exists, so of two racing processes exactly one wins and
  nobody ever sees a half-written lock. (Where hard links are not supported the fallback is
  ``O_CREAT | O_EXCL``; readers then retry a briefly empty file.)
* **Heartbeat**: while held, a daemon thread rewrites the record every ``heartbeat_s`` seconds
  (temporary file + ``os.replace``), only while the token in the file is still ours; when it is not,
  the lock is marked lost (:attr:`StoreLock.held` turns false) and the thread stops.
* **Busy**: a lock that is not stale makes :meth:`StoreLock.acquire` raise
  :class:`StoreLockedError` at once, naming the owner.
* **Stale**: the owner runs on this host and its pid is gone, or its heartbeat is older than
  ``stale_after_s`` (any host; this assumes clocks agree to well within ``stale_after_s``), or the
  file is unreadable and was last modified more than ``stale_after_s`` ago. A stale lock is taken
  over with a warning. Takeovers are serialised by a second ``O_EXCL`` file, ``run.lock.break``:
  its holder checks that ``run.lock`` is still the very file it judged stale, renames it to a unique
  name, checks again (same inode, same bytes) and deletes it -- or puts it back if a fresh lock
  slipped in -- and then competes for ``run.lock`` through the ordinary create. A break file
  abandoned by a crashed process is removed after :data:`BREAK_TIMEOUT_S`.
* **Release / force-unlock**: the file is renamed away first and inspected afterwards, so a release
  never deletes a lock that another process has taken over meanwhile.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from regcore.errors import InfrastructureError, InputError

__all__ = ["StoreLock", "StoreLockedError", "force_unlock", "read_lock", "LOCK_NAME"]

log = logging.getLogger(__name__)

#: the lock file's name inside the store directory
LOCK_NAME = "run.lock"
#: the file that serialises takeovers of a stale lock
BREAK_NAME = "run.lock.break"
#: a break file older than this (seconds) was left by a crashed process and is removed
BREAK_TIMEOUT_S = 10.0
#: how long acquire() keeps retrying while stale locks are being broken by others (seconds)
ACQUIRE_TIMEOUT_S = 5.0
LOCK_FORMAT_VERSION = 1


class StoreLockedError(InfrastructureError):
    """Another run holds the store's lock. ``owner`` is its record (``None`` if unreadable)."""

    def __init__(self, message: str, *, lock_path: Path, owner: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.lock_path = lock_path
        self.owner = owner


@dataclass(frozen=True)
class _Seen:
    """One read of a lock file: its parsed record (``None`` if unreadable) and what identifies it."""

    record: dict[str, Any] | None
    raw: bytes
    inode: tuple[int, int]
    mtime: float

    def same_file(self, other: "_Seen | None") -> bool:
        return other is not None and (self.inode, self.raw) == (other.inode, other.raw)


def _lock_path(store_path: str | os.PathLike[str]) -> Path:
    return Path(store_path) / LOCK_NAME


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("token"), str):
        return None
    return record


def _snapshot(path: Path) -> _Seen | None:
    """Read ``path`` once (stat and bytes from the same open file); ``None`` if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    return _Seen(_parse(raw), raw, (st.st_dev, st.st_ino), st.st_mtime)


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` (which must not exist) and flush it to disk."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=1) + "\n").encode("utf-8")


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` atomically; ``False`` if it already exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
    _write_file(tmp, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    finally:
        tmp.unlink(missing_ok=True)
    # no hard links on this file system: plain O_EXCL (readers retry a briefly empty file)
    try:
        _write_file(path, data)
        return True
    except FileExistsError:
        return False


def _detach(path: Path) -> Path | None:
    """Rename ``path`` to a unique name beside it (atomic); ``None`` if it no longer exists."""
    target = path.with_name(f".{path.name}.{secrets.token_hex(8)}.removed")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    return target


def _restore(detached: Path, path: Path) -> None:
    """Put a lock file renamed away by mistake back under its name, unless a new one is there."""
    try:
        os.link(detached, path)
    except FileExistsError:
        log.error("lock %s changed while it was being removed; a lock file was set aside as %s",
                  path, detached)
        return
    detached.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True   # exists but not ours / not a valid pid to probe: do not call it dead
    return True


def _describe(seen: _Seen, now: float | None = None) -> str:
    """Who holds the lock, for messages."""
    now = time.time() if now is None else now
    rec = seen.record
    if rec is None:
        return f"an unreadable lock file (last modified {now - seen.mtime:.1f} s ago)"
    beat = rec.get("heartbeat")
    age = f"{now - float(beat):.1f} s ago" if isinstance(beat, (int, float)) else "unknown"
    text = (f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}, started {rec.get('started', '?')}, "
            f"last heartbeat {age}")
    if rec.get("command"):
        text += f", command: {rec['command']}"
    return text


def read_lock(store_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lock record of the store at ``store_path``, or ``None`` when the store is not locked.

    Keys: ``version``, ``host``, ``pid``, ``started`` (ISO 8601 UTC), ``heartbeat`` (epoch
    seconds), ``token`` and ``command``. An unreadable lock file gives
    ``{"unreadable": True, "modified": <epoch seconds>}``.
    """
    seen = _snapshot(_lock_path(store_path))
    if seen is None:
        return None
    if seen.record is None:
        return {"unreadable": True, "modified": seen.mtime}
    return seen.record


def force_unlock(store_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Remove the store's lock whoever holds it; return the removed record (``None``: no lock).

    Only for a lock whose run is known to be dead: a live owner keeps running, notices the loss at
    its next heartbeat and logs an error, but is not stopped. An unreadable lock file gives
    ``{"unreadable": True, "modified": ...}``.
    """
    path = _lock_path(store_path)
    detached = _detach(path)
    if detached is None:
        return None
    try:
        seen = _snapshot(detached)
    finally:
        detached.unlink(missing_ok=True)
    if seen is None:
        return None
    owner = seen.record if seen.record is not None else {"unreadable": True, "modified": seen.mtime}
    log.warning("force-unlocked store %s (was held by %s)", store_path, _describe(seen))
    return owner


class StoreLock:
    """Exclusive, heartbeated lock on one store directory (``STORE/run.lock``).

    Use as ``with StoreLock(store) as lock: ...`` or call :meth:`acquire` / :meth:`release`.
    ``heartbeat_s``: how often the holder refreshes its heartbeat; ``stale_after_s``: a lock whose
    heartbeat is older than this is considered abandoned (must exceed ``heartbeat_s``, and should
    exceed it several times over). ``command`` defaults to this process's command line.
    """

    def __init__(self, store_path: str | os.PathLike[str], *, heartbeat_s: float = 10.0,
                 stale_after_s: float = 60.0, command: str | None = None) -> None:
        if not heartbeat_s > 0:
            raise InputError(f"StoreLock: heartbeat_s must be positive, got {heartbeat_s}")
        if not stale_after_s > heartbeat_s:
            raise InputError(f"StoreLock: stale_after_s ({stale_after_s}) must exceed heartbeat_s "
                             f"({heartbeat_s}), or a live lock would look stale")
        self.store = Path(store_path)
        self.path = self.store / LOCK_NAME
        self.heartbeat_s = float(heartbeat_s)
        self.stale_after_s = float(stale_after_s)
        self.command = shlex.join(sys.argv) if command is None else command
        self.record: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False
        self._mutex = threading.Lock()   # record/file updates: heartbeat thread vs release()

    # -- public -------------------------------------------------------------------------------

    @property
    def held(self) -> bool:
        """True between acquire() and release(), unless the heartbeat found the lock taken away."""
        return self.record is not None and not self._lost

    def acquire(self) -> dict[str, Any]:
        """Take the lock or raise :class:`StoreLockedError` at once; return our lock record.

        Creates the store directory (and parents) if needed. Stale locks are taken over with a
        warning. Raises :class:`InfrastructureError` when the directory cannot be written.
        """
        if self.record is not None:
            raise RuntimeError(f"StoreLock on {self.store} is already acquired by this object")
        try:
            self.store.mkdir(parents=True, exist_ok=True)
            record = self._acquire()
        except OSError as exc:
            raise InfrastructureError(f"cannot lock store {self.store}: {exc}") from exc
        self.record = record
        self._lost = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"store-lock-heartbeat:{self.store}",
                                        daemon=True)
        self._thread.start()
        log.info("locked store %s (pid %s, token %s)", self.store, record["pid"], record["token"][:8])
        return record

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours. Idempotent."""
        if self.record is None:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 2 * self.heartbeat_s))
        self._thread = None
        with self._mutex:
            token = self.record["token"]
            self.record = None
            try:
                detached = _detach(self.path)
                if detached is None:
                    log.warning("lock %s was already gone at release (force-unlocked?)", self.path)
                    return
                seen = _snapshot(detached)
                if seen is not None and seen.record is not None and seen.record.get("token") == token:
                    detached.unlink(missing_ok=True)
                    log.info("released lock on store %s", self.store)
                else:
                    _restore(detached, self.path)
                    log.warning("lock %s is no longer ours (now %s); left in place", self.path,
                                _describe(seen) if seen is not None else "gone")
            except OSError as exc:
                log.error("could not release lock %s: %s", self.path, exc)

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # -- internals ----------------------------------------------------------------------------

    def _new_record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "version": LOCK_FORMAT_VERSION,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "heartbeat": now,
            "token": secrets.token_hex(16),
            "command": self.command,
        }

    def _acquire(self) -> dict[str, Any]:
        deadline = time.monotonic() + ACQUIRE_TIMEOUT_S
        while True:
            record = self._new_record()
            if _create_exclusive(self.path, _encode(record)):
                return record
            seen = self._read_settled()
            if seen is None:
                continue                                   # released meanwhile: try again
            reason = self._stale_reason(seen)
            if reason is None:
                raise StoreLockedError(
                    f"store {self.store} is locked by another cohortreg run ({_describe(seen)}). "
                    f"Wait for that run to finish; if you are sure no run is active on this store, "
                    f"rerun with --force-unlock (lock file: {self.path}).",
                    lock_path=self.path, owner=seen.record)
            if self._break(seen):
                log.warning("taking over stale lock on store %s: %s (was %s)", self.store, reason,
                            _describe(seen))
            elif time.monotonic() > deadline:
                raise StoreLockedError(
                    f"store {self.store}: could not take over the stale lock {self.path} within "
                    f"{ACQUIRE_TIMEOUT_S:.0f} s ({_describe(seen)}); another process keeps breaking "
                    f"it. Retry, or use --force-unlock if you are sure no run is active.",
                    lock_path=self.path, owner=seen.record)
            else:
                time.sleep(0.01)

    def _read_settled(self) -> _Seen | None:
        """Read the lock; retry briefly while it is unreadable but brand new (being written)."""
        seen = _snapshot(self.path)
        for _ in range(10):
            if seen is None or seen.record is not None or time.time() - seen.mtime > 1.0:
                break
            time.sleep(0.02)
            seen = _snapshot(self.path)
        return seen

    def _stale_reason(self, seen: _Seen) -> str | None:
        """Why the lock ``seen`` is stale, or ``None`` if it must be respected."""
        now = time.time()
        rec = seen.record
        if rec is None:
            age = now - seen.mtime
            return f"unreadable lock file, unchanged for {age:.0f} s" if age > self.stale_after_s else None
        pid = rec.get("pid")
        if rec.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
        beat = rec.get("heartbeat")
        if not isinstance(beat, (int, float)):
            age = now - seen.mtime
            return f"no heartbeat, file unchanged for {age:.0f} s" if age > self.stale_after_s else None
        if now - beat > self.stale_after_s:
            return f"last heartbeat {now - beat:.0f} s ago (stale after {self.stale_after_s:g} s)"
        return None

    def _break(self, seen: _Seen) -> bool:
        """Remove the stale lock ``seen`` if it is still exactly that file; ``True`` if removed."""
        brk = self.store / BREAK_NAME
        if not _create_exclusive(brk, _encode({"pid": os.getpid(), "host": socket.gethostname(),
                                               "token": secrets.token_hex(8)})):
            other = _snapshot(brk)
            if other is not None and time.time() - other.mtime > BREAK_TIMEOUT_S:
                log.warning("removing abandoned %s", brk)
                brk.unlink(missing_ok=True)
            return False
        try:
            if not seen.same_file(_snapshot(self.path)):
                return False                          # changed since we judged it: look again
            detached = _detach(self.path)
            if detached is None:
                return False
            if seen.same_file(_snapshot(detached)):
                detached.unlink(missing_ok=True)
                return True
            _restore(detached, self.path)             # a fresh lock slipped in: put it back
            return False
        finally:
            brk.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._refresh():
                    return
            except OSError as exc:                     # transient storage trouble: keep trying
                log.warning("heartbeat on %s failed: %s", self.path, exc)

    def _refresh(self) -> bool:
        """Rewrite our record with a new heartbeat; ``False`` (lock lost or released) stops the thread."""
        with self._mutex:
            if self.record is None or self._stop.is_set():
                return False
            seen = _snapshot(self.path)
            if seen is None or seen.record is None or seen.record.get("token") != self.record["token"]:
                self._lost = True
                log.error("lost the lock on store %s: %s", self.store,
                          "lock file removed" if seen is None else f"now held by {_describe(seen)}")
                return False
            record = dict(self.record, heartbeat=time.time())
            tmp = self.path.with_name(f".{LOCK_NAME}.{record['token'][:16]}.beat")
            tmp.unlink(missing_ok=True)
            _write_file(tmp, _encode(record))
            os.replace(tmp, self.path)
            self.record = record
            return True
