"""Persistent state: onboarding progress, graded answers, finished profiles, a routing log (SQLite).

Owns: one SQLite file (``<state_dir>/satroute.db``) in WAL mode, and every SQL statement of the
project. Every graded answer is committed on its own the moment it is recorded, so a crash or a kill
loses nothing that was graded; a profile is written in the same transaction that marks its model
``done``, so a half-finished profile can never be read as a finished one. ``get`` makes the store the
``ProfileSource`` behind the provider registry: it answers only with finished profiles.
One writer per process: all writes go through one connection under a lock; reads go through a
second connection, so a read never waits behind a write that waits for another process's lock. Other
processes may read at the same time (WAL), and a second writer waits ``busy_timeout`` rather than
failing (opening a new database included: switching it to WAL is retried while another process holds it).
Who onboards a model: ``claim``/``begin`` take a lease on its ``onboarding`` row (``owner``, this
process's id, and a ``heartbeat`` the run refreshes), granted only when no other live process holds it;
a lease without a heartbeat for ``LEASE_STALE_S`` (or with one as far in the future, or of a dead
process on this host) is free again, so a crash never blocks a model for ever. ``ModelBusy`` says who holds it. The owner names the process
instance (``host:pid:random:boot-start``, the start time from /proc): a restarted container's proxy
is PID 1 again on the same host name, and must not take its dead predecessor for alive. A run's own
writes (``leased=True``) are made only while it still holds the lease.
Which upstream each proxy points a model at: a proxy records it (``using``, refreshed like a
heartbeat), and a model is forgotten because it now points at another upstream
(``forget(moved=True)``) only while no other live process points it at the stored one
(``UpstreamInUse`` otherwise): two proxies that disagree on a model's upstream (two containers'
providers.yaml, a rolling deploy that changes ``api_base``) would otherwise forget each other's
answers and profile in turn, for ever. What a model's onboarding spent outlives forgetting its
answers for another upstream (``spent_forgotten_usd``, beside the ``spent_usd`` of the answers
stored): the spend cap covers the model's name across such edits.
A failure is stored with a digest of the configuration it failed with (``failure``), so that
another process with the same one need not pay for the same failure again.
Durability: ``synchronous=NORMAL`` in WAL mode survives any crash or kill of the process; only an
operating-system crash or power loss may drop the last few commits (which are then asked again).
Damage: ``PRAGMA quick_check`` when the store opens (a damaged file is refused with one line,
not met later as a traceback on every read); a stored profile that no longer parses is skipped with
one warning. A file this process cannot write (SQLite opens it read-only without a word) is refused
when the store opens too, by a write that changes nothing.
Schema changes: a column added to an existing table is added to older databases when they are opened
(``_COLUMNS_ADDED``), so a database written by an earlier version keeps working and its rows stay
readable (the new columns read as null).
Does not know: how questions are asked or graded, HTTP, the scorer.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Iterator, Mapping, Sequence

try:
    import fcntl
except ImportError:  # no advisory locks where there is no fcntl (Windows): nothing is held
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("satroute.store")

DB_NAME = "satroute.db"
STATUSES = ("pending", "running", "stalled", "failed", "done")
BUSY_TIMEOUT_S = 30.0  # a write waits this long for another process's lock
LEASE_STALE_S = 60.0  # an onboarding lease without a heartbeat for this long is free again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS onboarding (
    model TEXT PRIMARY KEY,
    suite TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    total INTEGER NOT NULL DEFAULT 0,
    estimated_cost REAL,
    started_at REAL,
    updated_at REAL NOT NULL,
    upstream TEXT,
    spent_usd REAL,
    owner TEXT,
    heartbeat REAL,
    upstream_plain TEXT,
    failed_config TEXT,
    spent_forgotten_usd REAL
);
CREATE TABLE IF NOT EXISTS answers (
    model TEXT NOT NULL,
    question_id TEXT NOT NULL,
    letter TEXT,
    correct INTEGER NOT NULL,
    text TEXT,
    answered_at REAL NOT NULL,
    PRIMARY KEY (model, question_id)
);
CREATE TABLE IF NOT EXISTS profiles (
    model TEXT PRIMARY KEY,
    suite TEXT NOT NULL,
    tasks TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS upstream_users (
    model TEXT NOT NULL,
    owner TEXT NOT NULL,
    upstream TEXT NOT NULL,
    legacy TEXT,
    seen REAL NOT NULL,
    also TEXT,
    PRIMARY KEY (model, owner)
);
CREATE TABLE IF NOT EXISTS routing_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    requested TEXT NOT NULL,
    chosen TEXT NOT NULL,
    scores TEXT,
    scorer_ms REAL,
    failed TEXT,
    request_id TEXT,
    degraded TEXT
);
"""
# Columns added after a table was first released: (table, column, type), added when missing.
_COLUMNS_ADDED = (("routing_log", "failed", "TEXT"), ("routing_log", "request_id", "TEXT"),
                  ("routing_log", "degraded", "TEXT"), ("onboarding", "upstream", "TEXT"),
                  ("onboarding", "spent_usd", "REAL"), ("onboarding", "owner", "TEXT"),
                  ("onboarding", "heartbeat", "REAL"), ("onboarding", "upstream_plain", "TEXT"),
                  ("onboarding", "failed_config", "TEXT"), ("onboarding", "spent_forgotten_usd", "REAL"),
                  ("upstream_users", "also", "TEXT"))


# what a model's onboarding spent, as ``Store.spent`` counts it: on the answers stored, and on those
# forgotten since for another upstream
_SPENT = "COALESCE(spent_usd, 0) + COALESCE(spent_forgotten_usd, 0)"


class ModelBusy(Exception):
    """Another live process onboards the model (it holds a fresh lease on it)."""

    def __init__(self, model: str, owner: str):
        super().__init__(f"{model} is being onboarded by {owner}")
        self.model, self.owner = model, owner


class FailedAlready(ModelBusy):
    """Another process failed the model's run with the same configuration since this one read
    its own (``Store.claim``): the failure is this process's too, and no run begins."""

    def __init__(self, model: str, reason: str | None):
        super().__init__(model, "")
        self.reason = reason
        self.args = (f"another process on this state directory failed it with the same "
                     f"configuration: {reason}",)


class UpstreamInUse(ModelBusy):
    """The model's stored answers came from another upstream than this process's, and another live
    process points the model at that upstream now: they are its, and are not forgotten."""

    def __init__(self, model: str, owner: str):
        super().__init__(model, owner)
        self.args = (f"another proxy on this state directory ({owner}) points {model} at another "
                     "upstream, which its stored answers and profile come from: they are kept "
                     "while it does",)


@dataclass(frozen=True)
class Progress:
    """One model's onboarding state as stored."""

    model: str
    suite: str
    status: str
    reason: str | None
    total: int
    done: int
    correct: int
    estimated_cost: float | None  # USD the whole onboarding is estimated at (spent + left) as its run began
    updated_at: float
    spent: float = 0.0  # USD paid for its onboarding so far (estimated from lengths), as ``Store.spent``
    owner: str | None = None  # the lease on it, as stored (``Store.held`` says if it is held)
    heartbeat: float | None = None
    spent_forgotten: float = 0.0  # of ``spent``, what answers since forgotten cost (``Store.forget``)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.done if self.done else None

    def to_json(self) -> dict:
        return {"status": self.status, "reason": self.reason, "suite": self.suite,
                "questions_done": self.done, "questions_total": self.total,
                "accuracy_so_far": None if self.accuracy is None else round(self.accuracy, 4),
                "estimated_cost_usd": self.estimated_cost, "spent_usd": round(self.spent, 4),
                "spent_forgotten_usd": round(self.spent_forgotten, 4),
                "updated_at": self.updated_at}


@dataclass(frozen=True)
class GradedAnswer:
    question_id: str
    letter: str | None
    correct: bool
    text: str | None = None


@dataclass(frozen=True)
class RouteEntry:
    """One request to the router's name: what answered it and how it was chosen.

    ``scores`` and ``scorer_ms`` are None when the default model answered without scoring;
    ``failed`` lists ``(model, reason)`` of the models that failed before ``chosen`` answered;
    ``chosen`` is None when every model tried failed (the client got the error); ``degraded`` says
    why the profiles' means ranked it (``scorer_failed``, ``scorer_timeout``, ``scorer_stalled``) instead of the scorer.
    """

    requested: str
    chosen: str | None
    scores: Mapping[str, float] | None
    scorer_ms: float | None
    failed: tuple[tuple[str, str], ...] = ()
    request_id: str | None = None
    degraded: str | None = None
    at: float = 0.0  # unix seconds; 0: when it is written


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another connection holds the lock; trying again may succeed."""
    text = str(exc)
    return "locked" in text or "busy" in text


def _read_only(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_READONLY and its kinds: this process may not write the file (another user's, a
    read-only mount). An error raised by hand carries no name."""
    return (getattr(exc, "sqlite_errorname", None) or "").startswith("SQLITE_READONLY")


def _instance(pid: int | str = "self") -> str | None:
    """Which process instance ``pid`` is: the boot's id and the process's start time (clock ticks
    since boot), from Linux's /proc; None where /proc does not say. A pid used again (a restarted
    container's proxy is PID 1 again) is another instance."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        start = stat.rpartition(")")[2].split()[19]  # field 22; the fields after comm start at 3
    except (OSError, IndexError):
        return None
    return f"{boot[:8]}-{start}"


def _alive_here(owner: str) -> bool:
    """False only when ``owner`` (host:pid:random[:instance]) names a process of this host that
    has exited, or whose pid another process has now (its instance differs). An owner written
    without an instance (by an earlier version) is judged by its pid alone."""
    host, pid, _, instance = (owner.split(":", 3) + ["", "", ""])[:4]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        pass
    if instance:
        now = _instance(pid)
        if now is not None and now != instance:
            return False
    return True


class _Sightings:
    """When the time stored in another process's records (a lease's heartbeat, the ``seen`` of
    its upstream record) was written, on this process's monotonic clock: a record whose time
    changed since it was last read here was written since, whatever the wall clock did meanwhile.
    Read for the first time, its age is taken from the wall clock (the onboarding service reads
    every configured model's lease on each tick, and the upstream records it waits on, so that
    those it decides on were read before a step). Records not read for a while are forgotten
    (their owners' processes come and go)."""

    def __init__(self, stale_s: float):
        self._stale_s = stale_s
        self._seen: dict[tuple[str, ...], tuple[float, float, float]] = {}  # time, written, read
        self._lock = threading.Lock()
        self._pruned = time.monotonic()

    def age(self, key: tuple[str, ...], stored: float) -> float:
        """Seconds since the record ``key`` was written with ``stored``, as best this process
        can tell."""
        mono, wall = time.monotonic(), time.time()
        with self._lock:
            before = self._seen.get(key)
            if before is None:  # the wall clock is all there is to go by
                age = abs(wall - stored)
                written = mono - age if age < self._stale_s else -math.inf
            elif before[0] != stored:  # written since it was read last: not before that read
                written = mono - min(max(0.0, wall - stored), mono - before[2])
            else:
                written = before[1]
            self._seen[key] = (stored, written, mono)
            if mono - self._pruned > 10 * self._stale_s:
                self._pruned = mono
                self._seen = {k: v for k, v in self._seen.items() if mono - v[2] < 10 * self._stale_s}
        return mono - written


def _profile_json(tasks: Mapping[str, float]) -> str:
    """A profile as the ``profiles`` table stores it."""
    return json.dumps({k: float(v) for k, v in tasks.items()}, sort_keys=True)


def _finite_scores(scores: Mapping[str, float]) -> dict[str, float | None]:
    """Scores as JSON can hold them: an unscored candidate (-inf, NaN) as None."""
    return {k: v if math.isfinite(v) else None for k, v in scores.items()}


def unopenable(state_dir: str | Path, exc: BaseException) -> str:
    """What the line about a state store that cannot be opened says: the error, and what SQLite's
    own words ("disk I/O error", "unable to open database file") leave out, where it can be told:
    a folder that cannot be written, a filesystem that is full."""
    folder = Path(state_dir)
    hint = ""
    try:
        if folder.is_dir() and not os.access(folder, os.W_OK):
            hint = " (the folder cannot be written: a read-only volume, or another user's)"
        elif folder.is_dir() and (free := shutil.disk_usage(folder).free) < 1 << 20:
            hint = f" (its filesystem is full: {free} bytes free)"
    except OSError:
        pass
    return f"cannot open the state store in {state_dir}: {exc}{hint}"


RESTORE_WAIT_S = 30.0  # how long a store opening waits for a restore of its folder to end
# the copy `satroute restore` puts in place; beside no running restore, one that was killed
RESTORING = f".{DB_NAME}.restoring"
# that restore's id, beside it and in the replaced-<time> folder it makes (as ``RESTORE_ID``)
RESTORING_ID = f"{RESTORING}.id"
RESTORE_ID = ".restore-id"


def lock_folder(folder: Path, exclusive: bool, wait_s: float = 0.0) -> int | None:
    """An advisory lock (``flock``) on the state folder itself, held until its descriptor (the
    value) is closed: shared by every store open on it (a proxy, ``satroute onboard``),
    exclusive for ``satroute restore``, which thus never replaces the database under a process
    of this host that has it open, and which such a process waits for. ``BlockingIOError`` when
    the other kind is held past ``wait_s``; None where the file system takes no locks (some
    network ones) or there is no ``fcntl``: nothing is held, nothing is refused."""
    if fcntl is None:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that can be entered, not listed: nothing to lock with
        return None
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
            except OSError:  # ENOLCK, EINVAL: locks not supported here
                os.close(fd)
                return None
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def _killed_restore(folder: Path) -> str:
    """What to do about the part a killed ``satroute restore`` left in ``folder``. The restore
    copies what it replaces into a ``replaced-<time>`` folder marked with its id, and changes
    nothing before: with no folder of its id, the store there is as it was."""
    said = f"{folder} holds {RESTORING}, left by a `satroute restore` that was killed before it ended"
    taken = None
    try:
        made_by = (folder / RESTORING_ID).read_text()
        for aside in folder.glob("replaced-*"):
            with contextlib.suppress(OSError):
                if (aside / RESTORE_ID).read_text() == made_by:
                    taken = aside
    except OSError:  # no id: it was killed before it wrote one
        pass
    if taken is None:
        return (f"{said}, before it changed anything: run it again, or delete {RESTORING} to go on "
                "with the store as it is")
    return (f"{said}, while it replaced the store: run it again to finish it, or `satroute restore "
            f"{taken}` to go back to the store it was replacing")


class Store:
    """The state database. Safe to share between threads; one instance per process."""

    def __init__(self, state_dir: str | Path, lease_stale_s: float = LEASE_STALE_S):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / DB_NAME
        try:
            self._folder_lock = lock_folder(self.dir, exclusive=False, wait_s=RESTORE_WAIT_S)
        except BlockingIOError:
            raise sqlite3.OperationalError(
                f"{self.dir} is being restored (`satroute restore`) and was still locked after "
                f"{RESTORE_WAIT_S:.0f} s: start again once the restore has ended") from None
        instance = _instance()
        self.owner = (f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
                      + (f":{instance}" if instance else ""))
        self.lease_stale_s = lease_stale_s
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._bad_profiles: set[str] = set()  # models whose damaged stored profile was reported
        self._sightings = _Sightings(lease_stale_s)
        db = None
        try:  # a store that does not open gives up the folder's lock, and what it opened
            if (self.dir / RESTORING).exists():
                raise sqlite3.OperationalError(_killed_restore(self.dir))
            wal = self.path.with_name(f"{DB_NAME}-wal")
            self._wal_found = wal.is_file() and wal.stat().st_size > 0  # before opening makes one
            self._db = db = self._connect()
            self._wal()
            self._check()
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._lock:
                self._writable()
                self._db.executescript(_SCHEMA)
                self._add_missing_columns()
            self._reader = self._connect()
        except BaseException:
            if db is not None:
                db.close()
            self._unlock_folder()
            raise
        self._identity: tuple[int, int] | None = None  # unknown until a stat tells it
        for attempt in range(3):  # a network volume's passing ESTALE
            try:
                self._identity = self._file_identity()
                break
            except OSError:
                time.sleep(0.05 * (attempt + 1))

    def _file_identity(self) -> tuple[int, int] | None:
        """The database file's (device, inode); None when it does not exist. Another failure of
        ``stat`` (a network volume's ESTALE, a timeout) is raised: it tells nothing."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def file_changed(self) -> str | None:
        """Why the database file at ``path`` is no longer the one this store writes, or None: it
        was deleted, or another file was put in its place (a backup restored while the proxy
        runs). SQLite goes on writing to the file it opened, where nothing will read it. None too
        when it cannot be told now (``stat`` failed otherwise)."""
        try:
            now = self._file_identity()
        except OSError:
            return None
        if self._identity is None:  # the stats at open failed (a network volume's ESTALE)
            if now is None:  # SQLite made the file when the store opened: it was there then
                return "was deleted"
            self._identity = now
            return None
        if now == self._identity:
            return None
        return "was deleted" if now is None else "was replaced by another file"

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                             check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        return db

    def _wal(self) -> None:
        """Switch to WAL. That needs the database to itself, and SQLite answers BUSY at once (no
        busy handler) while another process opens the same new file: try again, up to the busy
        timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if _read_only(exc):
                    # a file in another journal mode (a copy `satroute backup` made, restored as
                    # root): the switch is its first write
                    raise self._unwritable(exc) from None
                if not _busy(exc) or time.monotonic() >= deadline:
                    raise
            except sqlite3.DatabaseError as exc:  # its first page is garbage: "file is not a database"
                raise self._damaged(str(exc)) from None
            time.sleep(0.02)

    def _check(self) -> None:
        """Refuse a damaged database at once (a page of garbage: bit rot, a torn copy), with one
        line that says what to do, rather than a traceback on every read that meets it later."""
        try:
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
        except sqlite3.OperationalError:  # locked, out of memory: says nothing about damage
            raise
        except sqlite3.DatabaseError as exc:  # too damaged for the check to go through
            problems = [str(exc)]
        if problems != ["ok"]:
            # one row may hold several lines, the first of them SQLite's "*** in database main ***"
            lines = [line.strip() for problem in problems for line in str(problem).splitlines()
                     if line.strip() and not line.startswith("*** ")] or ["quick_check failed"]
            more = f" (and {len(lines) - 3} more problems)" if len(lines) > 3 else ""
            raise self._damaged("; ".join(lines[:3]) + more)

    def _writable(self) -> None:
        """Refuse a database this process cannot write (a file owned by another user, a read-only
        mount) at once (caller holds the lock): SQLite opens such a file read-only without a word,
        and every write (answers, the routing log) would fail later. Setting ``user_version`` to
        its own value is a real write that changes nothing."""
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            self._db.execute(f"PRAGMA user_version={int(version)}")
        except sqlite3.OperationalError as exc:
            if not _read_only(exc):
                raise  # locked past the busy timeout: says nothing about permissions
            raise self._unwritable(exc) from None

    def _unwritable(self, exc: sqlite3.OperationalError) -> sqlite3.OperationalError:
        return sqlite3.OperationalError(
            f"{self.path} cannot be written ({exc}): give the user this process runs as "
            "write access to it and to its folder")

    def _damaged(self, problem: str) -> sqlite3.DatabaseError:
        stray = (f"; if {self.path.name} was just replaced (a backup restored), {DB_NAME}-wal and "
                 f"{DB_NAME}-shm beside it are the old file's: move them away too"
                 if self._wal_found else "")
        return sqlite3.DatabaseError(
            f"{self.path} is damaged: {problem}{stray}; restore it from a backup (`satroute "
            "restore`, of a copy `satroute backup` made), or move it away to start with an empty "
            "store (stored answers and profiles are then lost)")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (caller holds the lock): committed, or rolled back on an error.
        SQLite rolls back by itself on some errors (SQLITE_FULL): then there is nothing to roll
        back, and a failing ROLLBACK never replaces the error that caused it."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows of one query, on the reading connection (never behind a write that waits)."""
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def _add_missing_columns(self) -> None:
        """Bring a database created by an earlier version up to ``_SCHEMA`` (caller holds the lock).

        Checked and altered in one write transaction, so two processes opening the same old
        database at once do not both add a column.
        """
        with self._transaction():
            for table, column, kind in _COLUMNS_ADDED:
                have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        """Close the database, giving up the leases this instance still holds (its runs are over)
        and its record of the upstreams it points models at (``using``)."""
        with self._lock, self._read_lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("UPDATE onboarding SET owner = NULL, heartbeat = NULL "
                                 "WHERE owner = ?", (self.owner,))
                self._db.execute("DELETE FROM upstream_users WHERE owner = ?", (self.owner,))
            self._reader.close()
            self._db.close()
            self._unlock_folder()

    def _unlock_folder(self) -> None:
        fd, self._folder_lock = self._folder_lock, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- onboarding status ------------------------------------------------------------------
    def held(self, owner: str | None, heartbeat: float | None, row: tuple[str, str] | None = None) -> bool:
        """True when a lease stored as ``owner`` and ``heartbeat`` is held: it is this process's,
        or another live process's fresh one, refreshed less than ``lease_stale_s`` ago. ``row``
        names the record (``("lease", model)``, ``("user", model)``): one this process has read
        before is judged by when it saw the time in it change, on its own monotonic clock
        (``_Sightings``), so that a step of the wall clock (NTP at boot, a virtual machine
        resumed) does not make a live process's records look stale, or a dead one's fresh.
        Without ``row``, by the wall clock alone: fresh when the time in it is less than
        ``lease_stale_s`` from now, either way (one further ahead was written by a host whose
        clock was ahead, or before the clock was stepped back, and would keep a killed
        process's lease for as long)."""
        if owner is None:
            return False
        if owner == self.owner:
            return True
        age = (self._sightings.age((owner, *row), heartbeat or 0.0) if row is not None
               else abs(time.time() - (heartbeat or 0.0)))
        return age < self.lease_stale_s and _alive_here(owner)

    def _holder(self, model: str) -> str | None:
        """The owner of another live process's fresh lease on ``model``, else None (caller is in a
        write transaction, so the answer holds until it commits)."""
        row = self._db.execute("SELECT owner, heartbeat FROM onboarding WHERE model = ?",
                               (model,)).fetchone()
        if row is None or row[0] == self.owner or not self.held(*row, ("lease", model)):
            return None
        return row[0]

    def _own(self, model: str) -> None:
        """Raise ``ModelBusy`` unless this process holds ``model``'s lease (caller is in a write
        transaction): a run whose lease was taken over (or released under it) writes nothing."""
        row = self._db.execute("SELECT owner FROM onboarding WHERE model = ?", (model,)).fetchone()
        if row is None or row[0] != self.owner:
            raise ModelBusy(model, row[0] if row is not None and row[0]
                            else "another process (this run's lease was given up)")

    @contextlib.contextmanager
    def _leased(self, model: str) -> Iterator[None]:
        """A write transaction on ``model``'s onboarding that no other live process holds
        (``ModelBusy`` otherwise, and nothing written)."""
        with self._lock, self._transaction():
            owner = self._holder(model)
            if owner is not None:
                raise ModelBusy(model, owner)
            yield

    def claim(self, model: str, suite: str = "", config: str | None = None,
              failed_since: float | None = None) -> None:
        """Take the lease on onboarding ``model`` for this process (the row is created, ``pending``,
        if new); raises ``ModelBusy`` when another live process holds it, and ``FailedAlready``
        (nothing written) when the model's stored failure was recorded with ``config`` at
        ``failed_since`` or later (and not later than now, give or take ``lease_stale_s``: one
        from the future was recorded before the clock was stepped back): checked under the lease,
        where a check before taking it let a run begin after another process had failed the same
        one meanwhile."""
        now = time.time()
        with self._leased(model):
            if config is not None and failed_since is not None:
                row = self._db.execute("SELECT reason FROM onboarding WHERE model = ? AND status = "
                                       "'failed' AND failed_config = ? AND updated_at >= ? "
                                       "AND updated_at <= ?",
                                       (model, config, failed_since, now + self.lease_stale_s)).fetchone()
                if row is not None:
                    raise FailedAlready(model, row[0])
            self._db.execute(
                "INSERT INTO onboarding (model, suite, status, updated_at, owner, heartbeat) "
                "VALUES (?, ?, 'pending', ?, ?, ?) ON CONFLICT(model) DO UPDATE SET "
                "owner=excluded.owner, heartbeat=excluded.heartbeat",
                (model, suite, now, self.owner, now))

    def heartbeat(self, model: str) -> bool:
        """Refresh this process's lease on ``model``; False when it does not hold it (any more)."""
        with self._lock:
            cur = self._db.execute("UPDATE onboarding SET heartbeat = ? WHERE model = ? AND owner = ?",
                                   (time.time(), model, self.owner))
        return cur.rowcount == 1

    def release(self, model: str) -> None:
        """Give up this process's lease on ``model`` (nothing if it does not hold it)."""
        with self._lock:
            self._db.execute("UPDATE onboarding SET owner = NULL, heartbeat = NULL "
                             "WHERE model = ? AND owner = ?", (model, self.owner))

    def using(self, upstreams: Mapping[str, tuple]) -> None:
        """Record the upstream this process points each model at now (model -> its fingerprint,
        that fingerprint in the earlier versions' form and, optionally, the other forms earlier
        versions recorded for it, as ``upstream_changed`` takes them: ``also``, kept as JSON),
        replacing what it recorded before. A record counts while it is held as a lease is (its
        process alive, refreshed within ``lease_stale_s``): the caller refreshes it well within
        that. Records gone stale (``held``) are dropped."""
        now = time.time()
        with self._lock, self._transaction():
            rows = self._db.execute("SELECT model, owner, seen FROM upstream_users WHERE owner != ?",
                                    (self.owner,)).fetchall()
            self._db.executemany("DELETE FROM upstream_users WHERE model = ? AND owner = ?",
                                 [(m, o) for m, o, seen in rows if not self.held(o, seen, ("user", m))])
            self._db.execute("DELETE FROM upstream_users WHERE owner = ?", (self.owner,))
            self._db.executemany(
                "INSERT INTO upstream_users (model, owner, upstream, legacy, seen, also) VALUES (?, ?, ?, ?, ?, ?)",
                [(m, self.owner, forms[0], forms[1], now, json.dumps(list(forms[2])) if forms[2:] else None)
                 for m, forms in upstreams.items()])

    # a record names the stored upstream in any of the forms ``upstream_changed`` accepts
    _USERS = ("SELECT u.owner, u.seen, u.model FROM upstream_users u JOIN onboarding o ON o.model = u.model "
              "WHERE u.model = ? AND u.owner != ? AND (o.upstream_plain = u.upstream "
              "OR o.upstream IN (u.upstream, u.legacy) OR EXISTS (SELECT 1 FROM json_each(u.also) j "
              "WHERE j.value IN (o.upstream, o.upstream_plain)))")

    def _user(self, model: str) -> str | None:
        """Another live process that points ``model`` at the upstream its stored answers came
        from (``using``; the same upstream as ``upstream_changed`` tells it), else None (caller is
        in a write transaction, so the answer holds until it commits)."""
        return self._live(self._db.execute(self._USERS, (model, self.owner)).fetchall())

    def upstream_user(self, model: str) -> str | None:
        """``_user`` read without a write transaction: what a process waiting on another's upstream
        asks on each tick, so that waiting takes no write lock (``forget`` checks again in its own)."""
        return self._live(self._read(self._USERS, (model, self.owner)))

    def _live(self, users: Sequence[tuple[str, float, str]]) -> str | None:
        """The first of ``users`` (``(owner, seen, model)`` rows of ``_USERS``) held as a lease is."""
        return next((owner for owner, seen, model in users if self.held(owner, seen, ("user", model))),
                    None)

    def begin(self, model: str, suite: str, total: int, estimated_cost: float | None = None,
              upstream: str | None = None, legacy: str | None = None,
              plain: str | None = None) -> None:
        """Mark a model's onboarding as running under this process's lease (created if new;
        answers kept if resumed). ``upstream``, ``legacy`` and ``plain`` fingerprint what answers
        (as ``upstream_changed`` takes them): they are recorded where the row holds none, a stored
        one is kept (the run checked it names this upstream). Raises ``ModelBusy`` (and changes
        nothing) when another live process holds it."""
        now = time.time()
        with self._leased(model):
            self._db.execute(
                "INSERT INTO onboarding (model, suite, status, reason, total, estimated_cost, "
                "started_at, updated_at, upstream, upstream_plain, owner, heartbeat) "
                "VALUES (?, ?, 'running', NULL, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(model) DO UPDATE SET suite=excluded.suite, status='running', "
                "reason=NULL, total=excluded.total, estimated_cost=excluded.estimated_cost, "
                "updated_at=excluded.updated_at, "
                "upstream=COALESCE(onboarding.upstream, excluded.upstream), "
                "upstream_plain=COALESCE(onboarding.upstream_plain, excluded.upstream_plain), "
                "owner=excluded.owner, heartbeat=excluded.heartbeat",
                (model, suite, total, estimated_cost, now, now, legacy or upstream, plain or upstream,
                 self.owner, now))

    def upstream_changed(self, model: str, upstream: str, legacy: str | None = None,
                         also: Sequence[str] = (), plain: str | None = None) -> bool:
        """True when the model's stored answers came from another upstream than ``upstream`` (a
        fingerprint, ``upstream_fingerprint``). The same upstream: a row whose ``upstream_plain``
        or ``upstream`` is ``upstream``, or whose ``upstream`` is ``legacy`` (the same upstream's
        fingerprint in the form earlier versions compute, ``legacy_fingerprint``), or one stored
        without a fingerprint. A stored fingerprint is never rewritten: an earlier version sharing
        the store (a rolling upgrade, a rollback) compares ``upstream`` with its own form, and
        would take any other for another upstream and forget the model. What is missing is filled
        in: ``upstream`` in the ``legacy`` form (which every version that fingerprints reads) when
        given, and ``upstream_plain`` in the ``plain`` form (``plain_fingerprint``; ``upstream``
        when not given), the one the version before today's compares that column with.
        ``also``: other fingerprints of the same upstream that earlier versions recorded
        (``earlier_forms``), in either column. Nothing stored: False.

        One rewrite: an ``upstream_plain`` holding ``upstream`` where ``plain`` differs (a model on
        its provider's own ``api_base`` written out) was written in today's form by the version
        that recorded that column so, which every version since reads in either form; it is
        written in the ``plain`` form, which the version before it also reads."""
        with self._lock:
            row = self._db.execute("SELECT upstream, upstream_plain FROM onboarding WHERE model = ?",
                                   (model,)).fetchone()
            if row is None:
                return False
            stored, stored_plain = row
            forms = {upstream, legacy, plain, *also} - {None}
            if stored is not None and stored not in forms and stored_plain not in forms:
                return True
            if stored is None or stored_plain is None or (plain not in (None, upstream)
                                                          and stored_plain == upstream):
                self._db.execute("UPDATE onboarding SET upstream = COALESCE(upstream, ?), "
                                 "upstream_plain = CASE WHEN upstream_plain IS NULL OR upstream_plain = ? "
                                 "THEN ? ELSE upstream_plain END WHERE model = ? "
                                 "AND upstream IS ? AND upstream_plain IS ?",
                                 (legacy or upstream, upstream, plain or upstream, model, stored,
                                  stored_plain))
            return False

    def spent(self, model: str) -> float:
        """USD recorded as paid for the model's onboarding (0 when none): for the answers stored
        (``spent_usd``, which is all earlier versions read) and for those forgotten since because
        the model pointed at another upstream (``spent_forgotten_usd``: ``forget``)."""
        rows = self._read(f"SELECT {_SPENT} FROM onboarding WHERE model = ?", (model,))
        return float(rows[0][0]) if rows else 0.0

    def set_status(self, model: str, status: str, reason: str | None = None,
                   suite: str = "", total: int | None = None, leased: bool = False,
                   config: str | None = None) -> None:
        """Set a model's status and reason; ``total`` (the suite's question count) when given.
        ``leased``: only while this process holds the model's lease (``ModelBusy`` otherwise).
        ``config``, with ``failed``: a digest of the configuration the run failed with, which
        ``failure`` gives other processes to compare with theirs."""
        if status not in STATUSES:
            raise ValueError(f"unknown onboarding status {status!r}")
        with self._lock, self._transaction():
            if leased:
                self._own(model)
            self._db.execute(
                "INSERT INTO onboarding (model, suite, status, reason, total, updated_at, "
                "failed_config) VALUES (?, ?, ?, ?, COALESCE(?, 0), ?, ?) ON CONFLICT(model) DO "
                "UPDATE SET status=excluded.status, reason=excluded.reason, "
                "updated_at=excluded.updated_at, total=COALESCE(?, onboarding.total), "
                "failed_config=excluded.failed_config",
                (model, suite, status, reason, total, time.time(),
                 config if status == "failed" else None, total))

    def failure(self, model: str) -> tuple[str | None, float, str | None] | None:
        """The model's stored failure: the digest of the configuration it failed with (None where
        none was recorded), when (``updated_at``) and why; None unless its status is ``failed``."""
        rows = self._read("SELECT failed_config, updated_at, reason FROM onboarding WHERE model = ? "
                          "AND status = 'failed'", (model,))
        return rows[0] if rows else None

    def interrupted(self, model: str, reason: str = "interrupted") -> bool:
        """Mark this process's run of ``model`` stopped midway (shutdown, a signal): ``pending``
        with ``reason``, when it is ``running`` or ``stalled`` under this process's lease (a
        status the run already settled is kept). True when marked."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE onboarding SET status = 'pending', reason = ?, updated_at = ? "
                "WHERE model = ? AND owner = ? AND status IN ('running', 'stalled')",
                (reason, time.time(), model, self.owner))
        return cur.rowcount == 1

    def progress(self, model: str, questions: Collection[str] | None = None) -> Progress | None:
        """A model's stored state; with ``questions`` (the suite's ids), ``done`` and ``correct``
        count only answers to those (answers kept from another suite are not progress on this one)."""
        rows = self._progress("WHERE o.model = ?", (model,), questions)
        return rows[0] if rows else None

    def all_progress(self, questions: Collection[str] | None = None,
                     models: Collection[str] | None = None) -> list[Progress]:
        """Every stored model's progress, or those of ``models`` only: the rows of models no
        longer configured stay (their spend is kept), and reading them all at every tick cost a
        long-lived proxy more with each model it ever onboarded."""
        if models is None:
            return self._progress("", (), questions)
        return self._progress("WHERE o.model IN (SELECT value FROM json_each(?))",
                              (json.dumps(sorted(models)),), questions)

    def _progress(self, where: str, args: tuple, questions: Collection[str] | None) -> list[Progress]:
        on, on_args = "a.model = o.model", ()
        if questions is not None:
            on += " AND a.question_id IN (SELECT value FROM json_each(?))"
            on_args = (json.dumps(sorted(questions)),)
        rows = self._read(
            "SELECT o.model, o.suite, o.status, o.reason, o.total, o.estimated_cost, "
            "o.updated_at, COUNT(a.question_id), COALESCE(SUM(a.correct), 0), o.spent_usd, "
            f"o.owner, o.heartbeat, o.spent_forgotten_usd FROM onboarding o LEFT JOIN answers a "
            f"ON {on} {where} GROUP BY o.model ORDER BY o.model", on_args + args)
        return [Progress(model=r[0], suite=r[1], status=r[2], reason=r[3], total=r[4],
                         estimated_cost=r[5], updated_at=r[6], done=r[7], correct=r[8],
                         spent=(r[9] or 0.0) + (r[12] or 0.0), owner=r[10], heartbeat=r[11],
                         spent_forgotten=r[12] or 0.0)
                for r in rows]

    # -- graded answers ---------------------------------------------------------------------
    def record(self, model: str, answer: GradedAnswer, cost: float = 0.0,
               leased: bool = False) -> bool:
        """Commit one graded answer now, and add ``cost`` (USD) to the model's spend in the same
        transaction. False if an answer was already stored (it is kept as it was); the cost is
        added all the same: this answer was paid for too. ``leased``: only while this process
        holds the model's lease (``ModelBusy``, and nothing written, otherwise)."""
        with self._lock, self._transaction():
            if leased:
                self._own(model)
            cur = self._db.execute(
                "INSERT OR IGNORE INTO answers (model, question_id, letter, correct, text, "
                "answered_at) VALUES (?, ?, ?, ?, ?, ?)",
                (model, answer.question_id, answer.letter, int(bool(answer.correct)), answer.text,
                 time.time()))
            if cost:
                self._spend(model, cost)
            return cur.rowcount == 1

    def add_spend(self, model: str, cost: float, leased: bool = False) -> None:
        """Add ``cost`` (USD) to the model's spend: a request of the run that is no answer (a
        probe of whether the model answers at all)."""
        with self._lock, self._transaction():
            if leased:
                self._own(model)
            self._spend(model, cost)

    def _spend(self, model: str, cost: float) -> None:
        """Within the caller's transaction: ``cost`` (USD) added to the model's spend."""
        self._db.execute("UPDATE onboarding SET spent_usd = COALESCE(spent_usd, 0) + ? WHERE model = ?",
                         (cost, model))

    def answered(self, model: str) -> set[str]:
        return {r[0] for r in self._read("SELECT question_id FROM answers WHERE model = ?", (model,))}

    def graded(self, model: str) -> dict[str, bool]:
        rows = self._read("SELECT question_id, correct FROM answers WHERE model = ?", (model,))
        return {q: bool(c) for q, c in rows}

    def answers(self, model: str) -> list[GradedAnswer]:
        rows = self._read("SELECT question_id, letter, correct, text FROM answers WHERE model = ? "
                          "ORDER BY answered_at", (model,))
        return [GradedAnswer(q, letter, bool(c), text) for q, letter, c, text in rows]

    def regrade(self, model: str, grades: Mapping[str, tuple[str | None, bool]],
                profile: Mapping[str, float] | None = None, suite: str = "",
                leased: bool = False) -> bool:
        """Rewrite stored answers graded again (``grades``: question id -> its letter and whether
        it is right) and, with ``profile``, the model's stored profile when it was measured on
        ``suite`` (one of another suite is kept), in one transaction; a rewritten profile gives its
        ``done`` row a new ``updated_at``, so the processes sharing the store read it again. True
        when the profile was rewritten. ``leased``: only while this process holds the model's
        lease; otherwise only while no other live process holds it (it may be onboarding the
        model). ``ModelBusy``, and nothing written, otherwise."""
        now = time.time()
        with self._lock, self._transaction():
            if leased:
                self._own(model)
            elif (owner := self._holder(model)) is not None:
                raise ModelBusy(model, owner)
            self._db.executemany("UPDATE answers SET letter = ?, correct = ? WHERE model = ? "
                                 "AND question_id = ?",
                                 [(letter, int(right), model, q) for q, (letter, right) in grades.items()])
            if profile is None:
                return False
            cur = self._db.execute("UPDATE profiles SET tasks = ?, created_at = ? WHERE model = ? "
                                   "AND suite = ?", (_profile_json(profile), now, model, suite))
            if cur.rowcount == 0:
                return False
            self._db.execute("UPDATE onboarding SET updated_at = ? WHERE model = ? AND status = 'done'",
                             (now, model))
            return True

    # -- profiles ---------------------------------------------------------------------------
    def finish(self, model: str, suite: str, tasks: Mapping[str, float], note: str | None = None,
               leased: bool = False) -> None:
        """Store the finished profile and mark the model done, in one transaction (which ends
        the run's lease); ``note``, the status's reason, says what the profile may understate.
        ``leased``: only while this process holds the model's lease (``ModelBusy``, and nothing
        written, otherwise)."""
        now = time.time()
        body = _profile_json(tasks)
        with self._lock, self._transaction():
            if leased:
                self._own(model)
            self._db.execute(
                "INSERT INTO profiles (model, suite, tasks, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(model) DO UPDATE SET suite=excluded.suite, tasks=excluded.tasks, "
                "created_at=excluded.created_at", (model, suite, body, now))
            self._db.execute(
                "INSERT INTO onboarding (model, suite, status, reason, updated_at) "
                "VALUES (?, ?, 'done', ?, ?) ON CONFLICT(model) DO UPDATE SET "
                "status='done', reason=excluded.reason, updated_at=excluded.updated_at, owner=NULL, "
                "heartbeat=NULL",
                (model, suite, note, now))

    def get(self, model_name: str, upstream: str | None = None,
            legacy: str | None = None, also: Sequence[str] = ()) -> dict[str, float] | None:
        """A finished profile, or None (the ProfileSource seam of the provider registry). With
        ``upstream`` (a fingerprint), only one measured on that upstream: another model behind the
        same name has no profile yet. A row without a recorded upstream, or with ``legacy`` (the
        same upstream's fingerprint in an earlier version's form) or one of ``also``, is taken as
        measured on it (as ``upstream_changed`` does)."""
        forms = sorted({upstream, legacy, *also} - {None})
        marks = ", ".join("?" * len(forms)) or "NULL"
        rows = self._read("SELECT p.tasks FROM profiles p LEFT JOIN onboarding o ON o.model = p.model "
                          f"WHERE p.model = ? AND (? IS NULL OR o.upstream IS NULL OR o.upstream IN ({marks}) "
                          f"OR o.upstream_plain IN ({marks}))",
                          (model_name, upstream, *forms, *forms))
        if not rows:
            return None
        try:
            tasks = json.loads(rows[0][0])
            return {str(k): float(v) for k, v in tasks.items()}
        except (ValueError, TypeError, AttributeError) as exc:  # one damaged row: not the others
            if model_name not in self._bad_profiles:
                self._bad_profiles.add(model_name)
                log.warning("state store: the stored profile of %s is damaged (%s: %s); ignored, "
                            "the model has no profile until it is onboarded again", model_name,
                            type(exc).__name__, exc)
            return None

    def profile_suite(self, model_name: str) -> str | None:
        rows = self._read("SELECT suite FROM profiles WHERE model = ?", (model_name,))
        return rows[0][0] if rows else None

    def forget(self, model: str, moved: bool = False) -> float:
        """Drop what is stored about a model's test (to onboard it again from scratch), in one
        transaction: a crash never leaves a profile without its answers. Raises ``ModelBusy`` (and
        drops nothing) while another live process onboards it. ``moved``: forgotten because this
        process points the model at another upstream than the stored answers came from; then
        also ``UpstreamInUse`` (and nothing dropped) while another live process points it at
        theirs (``using``), and what the model's onboarding spent is kept with its name
        (``spent_forgotten_usd``, which ``spent`` counts), so that the spend cap covers it across
        such edits; without ``moved`` (an admin's ``--restart``) the spend goes too. Returns the
        USD spent before: kept, or dropped. A lease this process holds on it is kept (on a fresh
        ``pending`` row, which also holds the spend kept): forgetting, to start over, must not hand
        the model to another process before the new run begins."""
        with self._leased(model):
            if moved and (user := self._user(model)) is not None:
                raise UpstreamInUse(model, user)
            row = self._db.execute(f"SELECT owner = ?, {_SPENT} FROM onboarding WHERE model = ?",
                                   (self.owner, model)).fetchone()
            held, spent = (bool(row[0]), row[1]) if row is not None else (False, 0.0)
            for table in ("answers", "profiles", "onboarding"):
                self._db.execute(f"DELETE FROM {table} WHERE model = ?", (model,))
            kept = spent if moved and spent else None
            if held or kept is not None:
                now = time.time()
                self._db.execute("INSERT INTO onboarding (model, suite, status, updated_at, owner, "
                                 "heartbeat, spent_forgotten_usd) VALUES (?, '', 'pending', ?, ?, ?, ?)",
                                 (model, now, self.owner if held else None, now if held else None, kept))
            return spent

    # -- routing log ------------------------------------------------------------------------
    def log_routes(self, entries: Iterable[RouteEntry], keep: int = 0) -> None:
        """Append routing decisions in one commit; with ``keep`` > 0, only the newest ``keep``
        rows of the log are kept."""
        now = time.time()
        rows = [(e.at or now, e.requested, e.chosen or "",  # the column predates unanswered rows: "" = none
                 None if e.scores is None else json.dumps(_finite_scores(e.scores)), e.scorer_ms,
                 json.dumps([{"model": m, "reason": r} for m, r in e.failed]), e.request_id, e.degraded)
                for e in entries]
        with self._lock, self._transaction():
            self._db.executemany(
                "INSERT INTO routing_log (at, requested, chosen, scores, scorer_ms, failed, "
                "request_id, degraded) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            if keep > 0:
                self._db.execute(
                    "DELETE FROM routing_log WHERE id <= (SELECT id FROM routing_log "
                    "ORDER BY id DESC LIMIT 1 OFFSET ?)", (keep,))

    def recent_routes(self, limit: int = 100) -> list[dict]:
        """The newest ``limit`` decisions, newest first. ``failed`` is None on rows written before
        it was recorded; ``scores`` and ``scorer_ms`` are None where nothing was scored;
        ``chosen`` is None where no model answered."""
        rows = self._read("SELECT at, requested, chosen, scores, scorer_ms, failed, request_id, "
                          "degraded FROM routing_log ORDER BY id DESC LIMIT ?", (limit,))
        return [{"at": at, "requested": r, "chosen": c or None, "scores": json.loads(s) if s else None,
                 "scorer_ms": ms, "failed": json.loads(f) if f is not None else None,
                 "request_id": rid, "degraded": d} for at, r, c, s, ms, f, rid, d in rows]
