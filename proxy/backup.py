"""``satroute backup DEST``: a consistent copy of the state store, taken while the proxy runs.

The store (``satroute.db``) is in WAL mode: its latest writes sit in ``satroute.db-wal`` until
SQLite folds them into the file, so a copy of ``satroute.db`` alone taken under a running proxy
lacks them (answers paid for are asked again after a restore), and a copy of the three files
taken one after another may be torn. SQLite's online backup copies the database as one
transaction sees it, the WAL's writes included. ``local_server.key`` goes with it: the stored
failures are keyed with it (docs/onboarding.md). ``satroute restore`` (``proxy.restore``) puts
such a copy back, for stopped proxies: see docs/onboarding.md, "Backing up and restoring the
store".
"""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import stat
import sys
import threading
from pathlib import Path
from typing import Iterator

from proxy.localserver import KEY_FILE
from proxy.store import DB_NAME

INTERRUPTED = 128 + signal.SIGINT


class Stopped(BaseException):
    """SIGTERM while a copy is made: the copy is given up as Ctrl+C gives it up."""


def add_arguments(parser) -> None:
    parser.add_argument("dest", help="a folder to create (or an empty one) for the copy")
    parser.add_argument("--state-dir", help="state folder (default: SATROUTE_STATE_DIR or ./state)")


def state_dir(args) -> Path:
    return Path(args.state_dir or os.environ.get("SATROUTE_STATE_DIR") or "state")


def run(args) -> int:
    """Exit status 0 when the copy is made and checked, 2 when it cannot be, 130 / 143 when
    Ctrl+C / SIGTERM stops it (one line on stderr saying why; nothing of the attempt is left at
    ``dest``)."""
    source, dest = state_dir(args) / DB_NAME, Path(args.dest)
    try:
        with interruptible():
            copied = backup(source, dest)
            size = copied.stat().st_size
    except (OSError, sqlite3.Error, ValueError) as exc:
        print(f"satroute backup: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as exc:
        print(f"satroute backup: interrupted; nothing was kept at {dest}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Stopped) else INTERRUPTED
    print(f"backed up {source} to {copied} ({size} bytes; quick_check ok)")
    return 0


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM raises ``Stopped`` meanwhile (on the main thread), so that what was begun is
    cleaned up as after Ctrl+C; Python's default would end the process with the part left."""
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
    else:
        yield


def _stop(signum, frame) -> None:
    raise Stopped()


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Ctrl+C and SIGTERM are held off until the block is over (on the main thread, where Python
    acts on them), so that what it changes is changed whole; one that came meanwhile is then not
    acted on: the work it would have stopped is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: came.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def backup(source: Path, dest: Path) -> Path:
    """Copy the store at ``source`` into the folder ``dest`` (created, for its owner only; it must
    be empty if it exists), with ``local_server.key`` beside it when there is one; the copy's
    path. Both files are made readable by their owner only. The copy is checked (``PRAGMA
    quick_check``) before it is given its name; a copy that fails (a full disk, Ctrl+C) leaves
    nothing behind: ``dest`` and the folders above it as it found them. Another backup writing
    to ``dest`` at the same time is refused (``ValueError``), and what it wrote is left alone."""
    if not source.is_file():  # sqlite3.connect would make an empty database there
        raise ValueError(f"no state store at {source} (set --state-dir or SATROUTE_STATE_DIR)")
    if dest.is_symlink() and not dest.exists():
        raise ValueError(f"{dest} is a symbolic link to nothing: name a new folder, or an empty one")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest} exists and is not an empty folder: name a new one")
    mode = _owned(dest) if dest.exists() else None
    made = make_folders(dest)
    target, part = dest / DB_NAME, dest / f".{DB_NAME}.part"
    mine: list[Path] = []  # what this call created, removed again if it fails
    try:
        os.close(new_file(part, f"another backup is being written to {dest}: name another folder"))
        mine += [part, *(part.with_name(part.name + s) for s in ("-journal", "-wal", "-shm"))]
        copy(source, part)
        with deferred_signals():  # named and counted as this call's, or neither
            give_name(part, target, f"another backup was written to {dest} meanwhile: name another folder")
            mine.append(target)
        key = source.with_name(KEY_FILE)
        if key.is_file():
            fd = new_file(dest / KEY_FILE, f"another backup was written to {dest} meanwhile")
            mine.append(dest / KEY_FILE)
            with os.fdopen(fd, "wb") as out:
                out.write(key.read_bytes())
    except BaseException:
        for leftover in mine:
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: another backup may be writing there now
        if mode is not None:
            with contextlib.suppress(OSError):
                dest.chmod(mode)
        raise
    return target


def _owned(dest: Path) -> int:
    """An existing ``dest`` must be a folder of this user that no one else can write, and is made
    owner-only (its mode before, the value): in a folder another user made (a predictable
    ``/tmp/backup-<date>``), or can write to, the key and the copy could be swapped for theirs
    before a restore."""
    st = dest.stat()
    if st.st_uid != os.geteuid():
        raise ValueError(f"{dest} belongs to another user (uid {st.st_uid}): name a new folder, or "
                         "an empty one of your own")
    if st.st_mode & 0o022:
        raise ValueError(f"{dest} can be written by others than its owner: name a new folder, or "
                         "make it owner-only (chmod 700)")
    dest.chmod(0o700)
    return stat.S_IMODE(st.st_mode)


def make_folders(dest: Path) -> list[Path]:
    """Make ``dest`` (owner-only) and the folders above it that are missing; those made, outermost
    first. A folder another process makes meanwhile is taken as found, not as made."""
    missing = []
    folder = dest
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700 if folder == dest else 0o777)
        except FileExistsError:
            continue
        made.append(folder)
    return made


def new_file(path: Path, taken: str) -> int:
    """Create ``path``, readable and writable by its owner only; its descriptor. ``taken``: the
    ``ValueError``'s message when it exists (another process made it)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ValueError(taken) from None


def give_name(part: Path, target: Path, taken: str) -> None:
    """``part`` renamed ``target``, never over a file of that name another process put there
    (``ValueError`` with ``taken``): a hard link, which fails if ``target`` exists, then the
    part removed. Where links cannot be made (some network and FUSE file systems), a rename
    after a check."""
    try:
        os.link(part, target)
    except FileExistsError:
        raise ValueError(taken) from None
    except OSError:
        if target.exists():
            raise ValueError(taken) from None
        part.replace(target)
        return
    part.unlink()


def copy(source: Path, part: Path) -> None:
    """SQLite's online backup of ``source`` into ``part``, checked, as one self-contained file."""
    try:
        _backup(sqlite3.connect(source), part)  # as the proxy opens it: it recovers a WAL a killed one left
    except sqlite3.OperationalError:
        wal = source.with_name(f"{DB_NAME}-wal")
        if os.access(source.parent, os.W_OK) or (wal.exists() and wal.stat().st_size):
            raise
        # a stopped proxy's store on a read-only mount (a snapshot, a backup sidecar's volume):
        # SQLite cannot make the -shm a WAL database is opened with, and nothing writes it
        _backup(sqlite3.connect(f"{source.resolve().as_uri()}?immutable=1", uri=True), part)


def _backup(src: sqlite3.Connection, part: Path) -> None:
    try:
        out = sqlite3.connect(part)
        try:
            src.backup(out)  # in one step: one read transaction sees the whole database
            problems = [row[0] for row in out.execute("PRAGMA quick_check")]
            out.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            out.close()
    finally:
        src.close()
    if problems != ["ok"]:
        raise ValueError(f"the copy fails its check: {'; '.join(problems[:3])}")
