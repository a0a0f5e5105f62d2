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

import os
import shutil
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
    """Copy the store at ``source`` into the folder ``dest`` (created; it must be empty if it
    exists), with ``local_server.key`` beside it when there is one; the copy's path. The copy
    is checked (``PRAGMA quick_check``) before it is given its name."""
    if not source.is_file():  # sqlite3.connect would make an empty database there
        raise ValueError(f"no state store at {source} (set --state-dir or SATROUTE_STATE_DIR)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest} exists and is not an empty folder: name a new one")
    dest.mkdir(parents=True, exist_ok=True)
    target, part = dest / DB_NAME, dest / f".{DB_NAME}.part"
    src = sqlite3.connect(source)  # as the proxy opens it: it recovers a WAL a killed one left
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
        part.unlink(missing_ok=True)
        raise ValueError(f"the copy of {source} fails its check: {'; '.join(problems[:3])}")
    part.replace(target)
    key = source.with_name(KEY_FILE)
    if key.is_file():
        shutil.copy2(key, dest / KEY_FILE)  # its mode (owner only) with it
    return target
