"""``satroute restore SRC``: put a copy ``satroute backup`` made back into the state directory.

Done by hand, a restore has three ways to lose work: a proxy still running keeps writing to the
file it opened, or applies its WAL to the copied one (a ``cp`` over the file in place is not
seen); a ``satroute.db-wal`` a killed proxy left is applied to the restored file (the restore is
undone, or the file reads as damaged); and a file copied in as root cannot be written by the
proxy's user. This command refuses while a process of this host has the store open (the lock
``Store`` holds: ``lock_folder``), copies the files it replaces whole into ``replaced-<time>``
(never deleting them), puts the copy in under a temporary name and renames it last, and gives
the files the state folder's owner.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import sys
import time
from pathlib import Path

from proxy.backup import INTERRUPTED, Stopped, copy, deferred_signals, interruptible, new_file, state_dir
from proxy.localserver import KEY_FILE
from proxy.store import DB_NAME, RESTORE_ID, RESTORING as PART, RESTORING_ID, lock_folder

REPLACED = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", KEY_FILE)


def add_arguments(parser) -> None:
    parser.add_argument("src", help="a folder `satroute backup` made (or a satroute.db file)")
    parser.add_argument("--state-dir", help="state folder (default: SATROUTE_STATE_DIR or ./state)")


def run(args) -> int:
    """Exit status 0 when restored, 2 when it cannot be (one line on stderr saying why; the state
    folder as it was), 130 / 143 when Ctrl+C / SIGTERM stops it (the state folder as it was)."""
    state = state_dir(args)
    try:
        with interruptible():
            done = restore(Path(args.src), state)
    except (OSError, sqlite3.Error, ValueError) as exc:
        print(f"satroute restore: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as exc:
        print(f"satroute restore: interrupted; {state} is as it was", file=sys.stderr)
        return 143 if isinstance(exc, Stopped) else INTERRUPTED
    print(done)
    return 0


def restore(src: Path, state: Path) -> str:
    """Restore the copy at ``src`` (a folder holding ``satroute.db`` and maybe
    ``local_server.key``, or the database file itself) into ``state``; what was done, in a line.
    Raises ``ValueError`` (nothing changed) when ``src`` is no state store or fails its check,
    or when a process of this host has ``state``'s store open."""
    source = src / DB_NAME if src.is_dir() else src
    if not source.is_file():
        raise ValueError(f"no {DB_NAME} at {src}: name a folder `satroute backup` made, or the file")
    if not os.access(source, os.R_OK):
        raise ValueError(f"{source} cannot be read by this user (uid {os.geteuid()}): run the restore as "
                         "root (under compose, `docker compose run --rm --no-deps -u root satroute "
                         "restore ...`) or make it readable")
    target = state / DB_NAME
    if target.exists() and source.resolve() == target.resolve():
        raise ValueError(f"{source} is the state store itself: name a backup")
    state.mkdir(parents=True, exist_ok=True)
    try:
        held = lock_folder(state, exclusive=True)
    except BlockingIOError:
        raise ValueError(f"{state} is in use by a proxy, `satroute onboard` or another `satroute "
                         "restore` on this host: stop every process on it first (those on other "
                         "hosts too)") from None
    try:
        return _restore(source, src, state)
    finally:
        if held is not None:
            os.close(held)


def _restore(source: Path, src: Path, state: Path) -> str:
    part, key_part, made_by = state / PART, state / f".{KEY_FILE}.restoring", state / RESTORING_ID
    for stale in (part, key_part, made_by):  # a killed restore's: the lock says none runs now
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    for building in state.glob(".replaced-*.partial"):  # links and copies of a killed one's
        shutil.rmtree(building, ignore_errors=True)
    # this restore's id, which the folder of what it replaces carries: a store refusing to start
    # beside a part it left names that folder, never an earlier restore's (``store._killed_restore``)
    restore_id = secrets.token_hex(8)
    key = src / KEY_FILE if src.is_dir() else None
    with_key = key is not None and key.is_file()
    changing = False  # once what is replaced is copied aside: the part stays, a store's warning
    try:
        made_by.write_text(restore_id)
        os.close(new_file(part, f"{part} is being written by another restore"))  # (the lock is held)
        try:
            copy(source, part)  # checked, one self-contained file, as `satroute backup` makes it
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{source} is not a state store: {exc}") from None
        counts = _counts(part, source)
        if with_key:
            with os.fdopen(new_file(key_part, f"{key_part} exists"), "wb") as out:
                out.write(key.read_bytes())
        for path in (part, key_part) if with_key else (part,):
            _owned_like(path, state)
        # from here the state folder changes: Ctrl+C and SIGTERM wait for the end of it. What is
        # replaced is first copied whole (``_snapshot``); the key goes in before the database,
        # whose part is the last thing renamed: while it is there, a store refuses to start
        with deferred_signals():
            replaced = _snapshot(state, with_key, restore_id)
            changing = True
            for name in (f"{DB_NAME}-wal", f"{DB_NAME}-shm"):  # SQLite would apply them to the copy
                with contextlib.suppress(FileNotFoundError):
                    (state / name).unlink()
            if with_key:
                key_part.replace(state / KEY_FILE)
            part.replace(state / DB_NAME)
            made_by.unlink(missing_ok=True)
            _sync(state)
    except BaseException:
        if not changing:  # the state folder as it was
            for leftover in (part, key_part, made_by):
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)
        raise
    aside = f"; the files it replaced are in {replaced}" if replaced else ""
    return (f"restored {source} into {state / DB_NAME} ({counts}"
            f"{', with ' + KEY_FILE if with_key else ''}){aside}")


def _snapshot(state: Path, with_key: bool, restore_id: str = "") -> Path | None:
    """The store's files (and the key, when the backup brings one) linked, or copied where links
    cannot be made, into a new folder ``replaced-<UTC time>`` of ``state``, owner-only; that
    folder, or None when there was nothing there. It is built under a hidden name and named once
    whole, so that every ``replaced-`` folder holds a whole store (the database with its WAL),
    which ``satroute restore`` takes back; nothing in ``state`` is changed. It carries
    ``restore_id`` (``RESTORE_ID``). A failure removes what it built."""
    present = [name for name in REPLACED if (state / name).exists() and (with_key or name != KEY_FILE)]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    building = state / f".replaced-{stamp}.{os.getpid()}.partial"
    building.mkdir(mode=0o700)
    try:
        _owned_like(building, state)
        for name in present:
            try:
                os.link(state / name, building / name)
            except OSError:  # no hard links here: a copy, its metadata kept
                shutil.copy2(state / name, building / name)
        (building / RESTORE_ID).write_text(restore_id)
        _sync(building)
        n = 1
        while True:
            aside = state / (f"replaced-{stamp}" if n == 1 else f"replaced-{stamp}-{n}")
            if not aside.exists():
                building.rename(aside)
                return aside
            n += 1
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _owned_like(path: Path, state: Path) -> None:
    """Run as root (compose's recipe), ``path`` is given the owner of the state folder: the
    proxy's user, which could not write a file left to root."""
    owner = state.stat()
    if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
        os.chown(path, owner.st_uid, owner.st_gid)


def _counts(db_path: Path, source: Path) -> str:
    """What a restored store holds, in words: its profiles and stored answers. ``ValueError`` when
    it is no state store (``source``: the file it was copied from)."""
    db = sqlite3.connect(db_path)
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "onboarding" not in tables:
            raise ValueError(f"{source} is not a state store (no onboarding table)")
        if not {"profiles", "answers"} <= tables:  # a store of a version before these tables
            return "an earlier version's store"
        profiles = db.execute("SELECT COUNT(*) FROM profiles").fetchone()[0]
        answers, models = db.execute("SELECT COUNT(*), COUNT(DISTINCT model) FROM answers").fetchone()
    finally:
        db.close()
    return (f"{profiles} profile{'s' * (profiles != 1)}, {answers} answer{'s' * (answers != 1)} "
            f"of {models} model{'s' * (models != 1)}")


def _sync(folder: Path) -> None:
    """The renames made durable (a crash right after would otherwise lose them on some file
    systems)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
