"""``satroute backup DEST``: a consistent copy of the state store, taken while the proxy runs.

The store (``satroute.db``) is in WAL mode: its latest writes sit in ``satroute.db-wal`` until
SQLite folds them into the file, so a copy of ``satroute.db`` alone taken under a running proxy
lacks them (answers paid for are asked again after a restore), and a copy of the three files
taken one after another may be torn. SQLite's online backup copies the database as one
transaction sees it, the WAL's writes included. ``local_server.key`` goes with it: the stored
failures are keyed with it (docs/onboarding.md). Restoring is for a stopped proxy: see
docs/onboarding.md, "Backing up and restoring the store".
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from pathlib import Path

from proxy.localserver import KEY_FILE
from proxy.store import DB_NAME


def add_arguments(parser) -> None:
    parser.add_argument("dest", help="a folder to create (or an empty one) for the copy")
    parser.add_argument("--state-dir", help="state folder (default: SATROUTE_STATE_DIR or ./state)")


def run(args) -> int:
    """Exit status 0 when the copy is made and checked, 2 when it cannot be (one line on stderr
    saying why; nothing is left half written at ``dest``'s database)."""
    state = Path(args.state_dir or os.environ.get("SATROUTE_STATE_DIR") or "state")
    source, dest = state / DB_NAME, Path(args.dest)
    try:
        copied = backup(source, dest)
    except (OSError, sqlite3.Error, ValueError) as exc:
        print(f"satroute backup: {exc}", file=sys.stderr)
        return 2
    print(f"backed up {source} to {copied} ({copied.stat().st_size} bytes; quick_check ok)")
    return 0


def backup(source: Path, dest: Path) -> Path:
    """Copy the store at ``source`` into the folder ``dest`` (created, for its owner only; it must
    be empty if it exists), with ``local_server.key`` beside it when there is one; the copy's
    path. The copy is checked (``PRAGMA quick_check``) before it is given its name; a copy that
    fails (a full disk, Ctrl+C) leaves nothing behind, and ``dest`` as it found it."""
    if not source.is_file():  # sqlite3.connect would make an empty database there
        raise ValueError(f"no state store at {source} (set --state-dir or SATROUTE_STATE_DIR)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest} exists and is not an empty folder: name a new one")
    made = not dest.exists()
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    target, part = dest / DB_NAME, dest / f".{DB_NAME}.part"
    try:
        _copy(source, part)
        part.replace(target)
        key = source.with_name(KEY_FILE)
        if key.is_file():  # created owner-only, never readable by others for a moment
            fd = os.open(dest / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(key.read_bytes())
    except BaseException:
        for leftover in (target, part, *(part.with_name(part.name + s) for s in ("-journal", "-wal", "-shm")),
                         dest / KEY_FILE):
            leftover.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):
                dest.rmdir()
        raise
    return target


def _copy(source: Path, part: Path) -> None:
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
