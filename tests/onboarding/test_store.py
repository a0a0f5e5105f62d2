"""The state store: answers committed one by one, profiles only with `done`, crash safety."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from proxy.store import GradedAnswer, ModelBusy, RouteEntry, Store, UpstreamInUse

REPO = Path(__file__).resolve().parents[2]


def test_progress_of_the_models_asked_for_only(tmp_path):
    """The watch reads the configured models' rows only: those of models removed stay (their
    spend is kept), and reading them all every tick grew with every model ever onboarded."""
    with Store(tmp_path) as s:
        for m in ("a", "b", "c"):
            s.begin(m, "suite", total=2, estimated_cost=0.0)
            s.record(m, GradedAnswer("q1", "A", m != "b"))
        assert [p.model for p in s.all_progress()] == ["a", "b", "c"]
        picked = s.all_progress(["q1"], models=["c", "b", "gone"])
        assert [(p.model, p.done, p.correct) for p in picked] == [("b", 1, 0), ("c", 1, 1)]
        assert s.all_progress(models=[]) == []


def test_answers_progress_and_profile(tmp_path):
    with Store(tmp_path) as s:
        assert s.progress("m") is None and s.get("m") is None
        s.begin("m", "suite", total=3, estimated_cost=0.5)
        assert s.record("m", GradedAnswer("q1", "A", True, "the answer is (A)"))
        assert s.record("m", GradedAnswer("q2", None, False, "no idea"))
        assert not s.record("m", GradedAnswer("q1", "B", False))  # never overwritten
        p = s.progress("m")
        assert (p.status, p.done, p.total, p.correct, p.accuracy) == ("running", 2, 3, 1, 0.5)
        assert s.graded("m") == {"q1": True, "q2": False}
        assert s.answered("m") == {"q1", "q2"}
        assert s.get("m") is None  # no profile before `finish`, whatever is stored
        s.set_status("m", "stalled", "connection refused")
        assert s.progress("m").reason == "connection refused"
        s.finish("m", "suite", {"t1": 0.5, "t2": 1.0})
        assert s.get("m") == {"t1": 0.5, "t2": 1.0}
        assert s.profile_suite("m") == "suite"
        assert s.progress("m").status == "done"
        assert s.progress("m").to_json()["accuracy_so_far"] == 0.5
    with Store(tmp_path) as s:  # reopened: everything is still there
        assert s.get("m") == {"t1": 0.5, "t2": 1.0}
        assert [a.question_id for a in s.answers("m")] == ["q1", "q2"]
        s.forget("m")
        assert s.get("m") is None and s.progress("m") is None and not s.answered("m")


def test_unknown_status_is_refused(tmp_path):
    with Store(tmp_path) as s, pytest.raises(ValueError):
        s.set_status("m", "finished")


def test_wal_mode_and_routing_log(tmp_path):
    with Store(tmp_path) as s:
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        s.log_routes([RouteEntry("auto", "m1", {"m1": 0.9, "m2": 0.1}, 12.5)])
        assert s.recent_routes()[0]["chosen"] == "m1"


def test_a_graded_answer_survives_a_kill(tmp_path):
    """A writer killed with SIGKILL loses nothing it reported as recorded."""
    child = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from proxy.store import GradedAnswer, Store
        s = Store({str(tmp_path)!r})
        s.begin("m", "suite", total=10**6)
        i = 0
        while True:
            s.record("m", GradedAnswer(f"q{{i}}", "A", i % 2 == 0, "x" * 200))
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    reported = []
    for line in proc.stdout:
        reported.append(int(line))
        if len(reported) >= 200:
            break
    os.kill(proc.pid, signal.SIGKILL)
    rest, _ = proc.communicate(timeout=10)
    reported += [int(x) for x in rest.split()]
    assert proc.returncode == -signal.SIGKILL
    with Store(tmp_path) as s:
        stored = s.answered("m")
        assert {f"q{i}" for i in reported} <= stored
        assert s.progress("m").status == "running"  # and no profile appeared
        assert s.get("m") is None


def test_a_database_without_upstream_or_spend_columns_keeps_working(tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "satroute.db")
    old.executescript("""
        CREATE TABLE onboarding (model TEXT PRIMARY KEY, suite TEXT NOT NULL, status TEXT NOT NULL,
            reason TEXT, total INTEGER NOT NULL DEFAULT 0, estimated_cost REAL, started_at REAL,
            updated_at REAL NOT NULL);
        INSERT INTO onboarding VALUES ('m', 'suite', 'done', NULL, 2, 0.5, 1.0, 2.0);
        CREATE TABLE answers (model TEXT NOT NULL, question_id TEXT NOT NULL, letter TEXT,
            correct INTEGER NOT NULL, text TEXT, answered_at REAL NOT NULL,
            PRIMARY KEY (model, question_id));
        INSERT INTO answers VALUES ('m', 'q1', 'A', 1, 'the answer is (A)', 1.5);
    """)
    old.commit()
    old.close()
    with Store(tmp_path) as s:
        p = s.progress("m")
        assert (p.status, p.done, p.spent) == ("done", 1, 0.0) and s.spent("m") == 0.0
        assert not s.upstream_changed("m", "fp-1")  # none stored: the same one, now recorded
        assert not s.upstream_changed("m", "fp-1")
        assert s.upstream_changed("m", "fp-2")
        assert not s.upstream_changed("nobody", "fp-2")
    with Store(tmp_path) as s:  # recorded durably
        assert s.upstream_changed("m", "fp-2") and not s.upstream_changed("m", "fp-1")


def test_a_profile_is_given_only_for_the_upstream_it_was_measured_on(tmp_path):
    """The registry asks with the model's upstream fingerprint: a profile measured on another
    model or api_base under the same name is no profile of it (onboarding off re-tests nothing)."""
    with Store(tmp_path) as s:
        s.begin("m", "suite", total=1, upstream="fp-a")
        s.finish("m", "suite", {"t1": 0.5})
        assert s.get("m", "fp-a") == {"t1": 0.5}
        assert s.get("m", "fp-b") is None
        assert s.get("m") == {"t1": 0.5}  # no upstream given: whichever is stored
        s.finish("legacy", "suite", {"t1": 0.7})  # no upstream recorded (an earlier version's row)
        assert s.get("legacy", "fp-b") == {"t1": 0.7}
        assert s.get("nobody", "fp-a") is None


def _changed_for_an_earlier_version(path: Path, model: str, its_form: str) -> bool:
    """``Store.upstream_changed`` as versions before the fingerprint was normalised decide it: the
    ``upstream`` column against their own form (``legacy_fingerprint``), nothing else."""
    db = sqlite3.connect(path / "satroute.db")
    try:
        stored = db.execute("SELECT upstream FROM onboarding WHERE model = ?", (model,)).fetchone()[0]
    finally:
        db.close()
    return stored is not None and stored != its_form


def _as_an_earlier_version(path: Path, model: str, upstream: str | None) -> None:
    """A finished model as an earlier version stored it: ``upstream`` only (or none at all)."""
    with Store(path) as s:
        s.finish(model, "suite", {"t1": 0.5})
    db = sqlite3.connect(path / "satroute.db")
    db.execute("UPDATE onboarding SET upstream = ? WHERE model = ?", (upstream, model))
    db.commit()
    db.close()


def test_an_upstream_fingerprint_of_an_earlier_version_s_form_counts_as_the_same(tmp_path):
    """A store written before the fingerprint was normalised holds the earlier form (``legacy``):
    the same upstream, whose profile is given. Its fingerprint is kept as it is, so that an earlier
    version sharing the store (a rolling upgrade, a rollback), which compares it with its own form,
    still finds the same upstream; today's form is recorded beside it, and does without the
    earlier one from then on."""
    _as_an_earlier_version(tmp_path, "m", "fp-old-form")
    with Store(tmp_path) as s:
        assert s.get("m", "fp-new-form", legacy="fp-old-form") == {"t1": 0.5}
        assert s.get("m", "fp-new-form") is None and s.get("m", "fp-other", legacy="fp-x") is None
        assert s.upstream_changed("m", "fp-other", legacy="fp-x")
        assert not s.upstream_changed("m", "fp-new-form", legacy="fp-old-form")
        assert not _changed_for_an_earlier_version(tmp_path, "m", "fp-old-form")
        s.claim("m")
        s.begin("m", "suite", total=1, upstream="fp-new-form", legacy="fp-old-form")  # a run resumed
    assert not _changed_for_an_earlier_version(tmp_path, "m", "fp-old-form")
    with Store(tmp_path) as s:
        assert not s.upstream_changed("m", "fp-new-form")  # today's form was recorded beside it
        assert s.get("m", "fp-new-form") == {"t1": 0.5}
        assert s.upstream_changed("m", "fp-other") and s.get("m", "fp-other") is None
    assert not _changed_for_an_earlier_version(tmp_path, "m", "fp-old-form")


def test_a_fingerprint_is_recorded_in_the_form_earlier_versions_read(tmp_path):
    """A row stored without a fingerprint (by a version that recorded none), and a new one, get
    the earlier form in ``upstream``, the one every version that fingerprints compares with its
    own: one sharing the store, or rolled back to, finds the same upstream and forgets nothing."""
    _as_an_earlier_version(tmp_path, "unrecorded", None)
    with Store(tmp_path) as s:
        assert not s.upstream_changed("unrecorded", "fp-new-form", legacy="fp-old-form")
        assert not _changed_for_an_earlier_version(tmp_path, "unrecorded", "fp-old-form")
        s.claim("new")
        s.begin("new", "suite", total=1, upstream="fp-new-form", legacy="fp-old-form")
        assert not s.upstream_changed("new", "fp-new-form", legacy="fp-old-form")
        assert not s.upstream_changed("new", "fp-new-form")
        s.begin("plain", "suite", total=1, upstream="fp-only")  # no earlier form given: today's
        assert not s.upstream_changed("plain", "fp-only")
    assert not _changed_for_an_earlier_version(tmp_path, "new", "fp-old-form")
    assert not _changed_for_an_earlier_version(tmp_path, "plain", "fp-only")


def test_answers_graded_again_are_rewritten_with_their_profile(tmp_path):
    """``regrade`` rewrites the grades and the profile of the suite they were measured on in one
    transaction (a profile of another suite is kept), and gives the done row a new updated_at so
    that the processes sharing the store read the profile again; never while another live
    process holds the model, which may be onboarding it."""
    with Store(tmp_path) as s, Store(tmp_path) as other:
        for model, suite in (("m", "suite"), ("measured-elsewhere", "other-suite")):
            s.record(model, GradedAnswer("q1", "A", False, "The answer is (A)."))
            s.record(model, GradedAnswer("q2", "B", True, "The answer is (B)."))
            s.finish(model, suite, {"t1": 0.5})
        before = s.progress("m").updated_at
        time.sleep(0.01)
        assert s.regrade("m", {"q1": ("A", True)}, {"t1": 1.0}, "suite")
        assert s.graded("m") == {"q1": True, "q2": True} and s.get("m") == {"t1": 1.0}
        assert s.progress("m").updated_at > before and s.progress("m").status == "done"
        assert not s.regrade("measured-elsewhere", {"q1": ("A", True)}, {"t1": 1.0}, "suite")
        assert s.graded("measured-elsewhere")["q1"] and s.get("measured-elsewhere") == {"t1": 0.5}
        other.claim("m")
        with pytest.raises(ModelBusy):
            s.regrade("m", {"q2": (None, False)}, {"t1": 0.5}, "suite")
        assert s.graded("m")["q2"] and s.get("m") == {"t1": 1.0}
        with pytest.raises(ModelBusy):  # a run's own regrade needs its lease
            s.regrade("m", {"q2": (None, False)}, leased=True)
        assert not other.regrade("m", {"q2": (None, False)}, leased=True)
        assert s.answers("m")[1] == GradedAnswer("q2", None, False, "The answer is (B).")


def test_spend_is_recorded_with_each_answer(tmp_path):
    with Store(tmp_path) as s:
        s.begin("m", "suite", total=3, upstream="fp")
        assert s.record("m", GradedAnswer("q1", "A", True), cost=0.25)
        assert s.record("m", GradedAnswer("q2", "B", False), cost=0.5)
        # stored before (another process asked it too): kept as it was, but paid for all the same
        assert not s.record("m", GradedAnswer("q1", "B", False), cost=9.0)
        assert s.graded("m")["q1"] is True
        assert s.spent("m") == 9.75 and s.progress("m").to_json()["spent_usd"] == 9.75
        s.begin("m", "suite", total=3)  # resumed: spend and upstream kept
        assert s.spent("m") == 9.75 and not s.upstream_changed("m", "fp")
        s.forget("m")
        assert s.spent("m") == 0.0


def test_the_spend_outlives_answers_forgotten_for_another_upstream(tmp_path):
    """Each edit of api_base forgot the spend with the answers, so edits back and forth spent
    without limit: the spend stays with the model's name (in a column of its own: ``spent_usd``,
    which earlier versions read, is still the spend of the answers stored); an admin's
    ``--restart`` (``forget`` without ``moved``) drops it too, and says how much."""
    import sqlite3

    with Store(tmp_path) as s:
        s.begin("m", "suite", total=3, upstream="a")
        s.record("m", GradedAnswer("q1", "A", True), cost=0.5)
        s.release("m")
        assert s.forget("m", moved=True) == 0.5  # no lease held: the row stays for the spend
        p = s.progress("m")
        assert (p.status, p.done, p.owner, p.spent, p.spent_forgotten) == ("pending", 0, None, 0.5, 0.5)
        assert p.to_json()["spent_usd"] == 0.5 and p.to_json()["spent_forgotten_usd"] == 0.5
        assert s.answered("m") == set() and s.get("m") is None and s.spent("m") == 0.5
        assert not s.upstream_changed("m", "b")  # nothing of another upstream's left to forget
        s.claim("m", "suite")
        s.begin("m", "suite", total=3, upstream="b")
        s.record("m", GradedAnswer("q1", "B", False), cost=0.25)
        assert s.spent("m") == 0.75 and s.progress("m").to_json()["spent_usd"] == 0.75
        assert s.upstream_changed("m", "a")
        assert s.forget("m", moved=True) == 0.75  # held: the lease and the spend both stay
        assert s.spent("m") == 0.75 and s.heartbeat("m")
        db = sqlite3.connect(tmp_path / "satroute.db")
        assert db.execute("SELECT spent_usd, spent_forgotten_usd FROM onboarding").fetchall() == [(None, 0.75)]
        db.close()
        assert s.forget("m") == 0.75  # --restart: the spend goes with the rest
        assert s.spent("m") == 0.0 and s.progress("m").spent_forgotten == 0.0


def test_one_process_at_a_time_holds_a_model(tmp_path):
    """The lease: another store (process) can neither begin, claim nor forget a model while its
    owner's lease is fresh; it can once the owner releases it, or its heartbeat is stale."""
    with Store(tmp_path) as a, Store(tmp_path, lease_stale_s=0.3) as b:
        a.claim("m", "suite")
        a.begin("m", "suite", total=3)
        a.record("m", GradedAnswer("q1", "A", True))
        for attempt in (lambda: b.claim("m"), lambda: b.begin("m", "suite", total=3),
                        lambda: b.forget("m")):
            with pytest.raises(ModelBusy) as busy:
                attempt()
            assert busy.value.owner == a.owner and busy.value.model == "m"
        assert a.answered("m") == {"q1"} and a.progress("m").status == "running"
        assert a.heartbeat("m") and not b.heartbeat("m")
        a.release("m")
        b.claim("m")  # released: free
        assert not a.heartbeat("m")  # a's lease is gone
        b.release("m")
        a.claim("m")
        time.sleep(0.35)  # no heartbeat from a: stale for b
        b.begin("m", "suite", total=3)
        assert b.heartbeat("m") and not a.heartbeat("m")
        a.claim("other")
    with Store(tmp_path) as c:  # closing a store gives up its leases
        c.claim("other")


def test_forgetting_a_model_keeps_the_lease_of_the_process_that_forgets(tmp_path):
    """--restart, or a changed upstream: the answers go, the model stays this process's until its
    new run begins (another process must not take it in between)."""
    with Store(tmp_path) as a, Store(tmp_path) as b:
        a.claim("m", "suite")
        a.begin("m", "suite", total=3)
        a.record("m", GradedAnswer("q1", "A", True), cost=0.5)
        a.forget("m")
        assert a.answered("m") == set() and a.spent("m") == 0.0
        assert a.progress("m").status == "pending"
        with pytest.raises(ModelBusy):
            b.claim("m")
        assert a.heartbeat("m")
        a.begin("m", "suite", total=3)  # its own new run
        a.release("m")
        b.forget("m")  # held by nobody: forgotten, and no row is left
        assert b.progress("m") is None


def test_answers_another_live_process_points_at_are_not_forgotten_for_another_upstream(tmp_path):
    """Two proxies on one state directory point a model at two upstreams (two hosts'
    providers.yaml; a rolling deploy that changes api_base): the stored answers and profile are
    the one's whose upstream they came from, and the other may not forget them while that one
    points there (in either form of the fingerprint). They may be forgotten once it points
    elsewhere, stops (closes its store), dies, or its record goes stale; and by a process that
    itself pointed there (an edit of one proxy's own file), or for ``--restart``."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead = f"{socket.gethostname()}:{child.stdout.strip()}:abcd"
    with Store(tmp_path, lease_stale_s=0.3) as mine, Store(tmp_path) as other:

        def measured_on_u1():
            other.begin("m", "suite", 1, upstream="u1", legacy="u1-old")
            other.finish("m", "suite", {"t": 0.5})

        measured_on_u1()
        mine.using({"m": ("u2", "u2-old")})
        for points in (("u1", "u1-old"), ("u1", None), ("u1-other-form", "u1-old")):
            other.using({"m": points})
            with pytest.raises(UpstreamInUse) as in_use:
                mine.forget("m", moved=True)
            assert in_use.value.owner == other.owner and other.owner in str(in_use.value)
            assert isinstance(in_use.value, ModelBusy) and mine.get("m") == {"t": 0.5}
        other.using({"m": ("u2", "u2-old")})  # it points there too now
        mine.forget("m", moved=True)
        assert mine.progress("m") is None
        for gone in ("stale", "dead", "closed"):
            measured_on_u1()
            other.using({"m": ("u1", "u1-old")})
            if gone == "stale":
                time.sleep(0.35)  # not refreshed: it no longer runs (a host gone)
            elif gone == "dead":
                mine._db.execute("UPDATE upstream_users SET owner = ? WHERE owner = ?",
                                 (dead, other.owner))
            else:
                other.close()
            mine.forget("m", moved=True)
            assert mine.progress("m") is None
        with Store(tmp_path) as other:
            measured_on_u1()
            mine.using({"m": ("u1", "u1-old")})  # only this process pointed there ...
            mine.forget("m", moved=True)  # ... and its file was edited since: forgotten
            measured_on_u1()
            other.using({"m": ("u1", "u1-old")})
            mine.forget("m")  # --restart, not for another upstream: not refused
            assert mine.progress("m") is None


@pytest.mark.parametrize("step_s", [3600.0, -3600.0])
def test_a_step_of_the_wall_clock_makes_no_live_process_look_dead(tmp_path, monkeypatch, step_s):
    """NTP stepping the clock, or a virtual machine resumed: another process's lease and upstream
    record, read here before the step, stay held until they go unrefreshed for lease_stale_s on
    this process's own clock: its run is not taken over, its answers are not forgotten, and its
    record is not dropped. Not refreshed, they go stale as before."""
    with Store(tmp_path, lease_stale_s=0.5) as mine, Store(tmp_path) as other:
        other.claim("run")
        other.begin("run", "suite", total=3)
        other.begin("m", "suite", 1, upstream="u1", legacy="u1-old")
        other.finish("m", "suite", {"t": 0.5})
        other.release("m")
        other.using({"m": ("u1", "u1-old")})
        mine.using({"m": ("u2", "u2-old")})
        assert mine.upstream_user("m") == other.owner  # what a process waiting on it reads each tick
        with pytest.raises(ModelBusy):
            mine.claim("run")
        wall = time.time
        monkeypatch.setattr(time, "time", lambda: wall() + step_s)
        with pytest.raises(ModelBusy):
            mine.claim("run")
        with pytest.raises(UpstreamInUse):
            mine.forget("m", moved=True)
        mine.using({"m": ("u2", "u2-old")})  # must not drop other's record as stale
        assert mine.upstream_user("m") == other.owner and mine.get("m") == {"t": 0.5}
        assert other.heartbeat("run")  # refreshed after the step: still held
        other.using({"m": ("u1", "u1-old")})
        time.sleep(0.3)
        with pytest.raises(ModelBusy):
            mine.claim("run")
        assert mine.upstream_user("m") == other.owner
        time.sleep(0.3)  # 0.6 s unrefreshed on this process's clock: stale, whatever the wall says
        mine.claim("run")
        mine.forget("m", moved=True)
        assert mine.progress("m") is None


def test_a_lease_of_a_dead_process_on_this_host_is_free(tmp_path):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    dead = f"{socket.gethostname()}:{child.stdout.strip()}:abcd"
    with Store(tmp_path) as s:
        s.begin("m", "suite", total=3)
        s._db.execute("UPDATE onboarding SET owner = ?, heartbeat = ?", (dead, time.time()))
        s.claim("m")  # its heartbeat is fresh, but its process has exited
        elsewhere = f"another-host:{child.stdout.strip()}:abcd"
        s._db.execute("UPDATE onboarding SET owner = ?, heartbeat = ?", (elsewhere, time.time()))
        with pytest.raises(ModelBusy):  # a process of another host: only its heartbeat tells
            s.claim("m")


def test_two_processes_claim_a_model_at_once_one_wins(tmp_path):
    child = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from proxy.store import ModelBusy, Store
        s = Store({str(tmp_path)!r})
        while time.time() < float(sys.argv[1]):
            pass
        try:
            s.begin("m", "suite", total=3)
            print("won", flush=True)
            time.sleep(1)
        except ModelBusy as exc:
            print("busy", exc.owner == s.owner, flush=True)
    """)
    start = f"{time.time() + 1.0}"
    procs = [subprocess.Popen([sys.executable, "-c", child, start], stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = sorted(p.communicate(timeout=20)[0].strip() for p in procs)
    assert outs == ["busy False", "busy False", "won"]


def test_opening_a_new_database_waits_while_another_process_switches_it(tmp_path, monkeypatch):
    """Switching a new database to WAL answers "database is locked" at once (no busy handler)
    while another process opens it at the same time: the open tries again."""
    refusals = []

    class Refusing(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql == "PRAGMA journal_mode=WAL" and len(refusals) < 3:
                refusals.append(sql)
                raise sqlite3.OperationalError("database is locked")
            return super().execute(sql, *args)

    connect = Store._connect
    monkeypatch.setattr(Store, "_connect", lambda self: connect(self) if refusals else
                        sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                        factory=Refusing))
    with Store(tmp_path) as s:
        assert len(refusals) == 3
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_full_disk_reports_its_own_error_and_leaves_no_transaction_open(tmp_path):
    """SQLite rolls back by itself on SQLITE_FULL; the store must say "full", not "cannot
    rollback", and go on writing once there is room."""
    with Store(tmp_path) as s:
        pages = s._db.execute("PRAGMA page_count").fetchone()[0]
        s._db.execute(f"PRAGMA max_page_count={pages + 2}")
        rows = [RouteEntry("auto", "m1", {"m1": 0.5}, 1.0, request_id="x" * 200)] * 3000
        with pytest.raises(sqlite3.OperationalError, match="full"):
            s.log_routes(rows)
        assert not s._db.in_transaction
        s._db.execute("PRAGMA max_page_count=1000000")
        s.log_routes(rows[:1])
        assert len(s.recent_routes()) == 1


def test_a_read_does_not_wait_behind_a_write_waiting_for_another_process(tmp_path):
    with Store(tmp_path) as s:
        s.begin("m", "suite", total=3)
        other = sqlite3.connect(tmp_path / "satroute.db", isolation_level=None,
                                check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock for 1 s
        threading.Timer(1.0, other.execute, ("COMMIT",)).start()
        writer = threading.Thread(target=s.record, args=("m", GradedAnswer("q1", "A", True)))
        writer.start()
        time.sleep(0.1)  # the write waits for the lock, holding the store's
        t0 = time.monotonic()
        assert s.progress("m").done == 0 and s.get("m") is None
        assert time.monotonic() - t0 < 0.5
        writer.join(5)
        assert s.answered("m") == {"q1"}


def test_a_run_is_not_claimed_for_a_failure_of_its_configuration_stored_meanwhile(tmp_path):
    """A proxy checked another's stored failure before claiming the lease: a run of its own could
    begin in between, just after the other failed, and pay for the same failure again. The check
    is made in the claim, under the lease."""
    import time

    from proxy.store import FailedAlready

    with Store(tmp_path) as other, Store(tmp_path) as mine:
        read_at = time.time()  # when this process read its configuration
        other.set_status("m", "failed", "invalid api key", suite="s", config="cfg-1")
        with pytest.raises(FailedAlready, match="same configuration: invalid api key"):
            mine.claim("m", "s", config="cfg-1", failed_since=read_at)
        assert mine.progress("m").status == "failed" and mine.progress("m").owner is None
        mine.claim("m", "s", config="cfg-2", failed_since=read_at)  # another configuration: runs
        mine.release("m")
        mine.claim("m", "s", config="cfg-1", failed_since=time.time() + 1)  # read after: runs
        mine.release("m")
        mine.claim("m", "s")  # `satroute onboard`: no such check


def test_a_process_on_a_stored_upstream_in_an_earlier_form_keeps_it_from_being_forgotten(tmp_path):
    """A row an earlier version stored with OpenAI's api_base written out, a live proxy whose file
    leaves it out (the same upstream: earlier_forms), and a third pointing the model elsewhere:
    the third must wait, not forget the live proxy's profile."""
    with Store(tmp_path) as earlier, Store(tmp_path) as live, Store(tmp_path) as elsewhere:
        earlier.begin("m", "suite", 1, upstream="plain-written-out", legacy="legacy-written-out")
        earlier.finish("m", "suite", {"t": 0.5})
        earlier.release("m")
        forms = ("plain-left-out", "legacy-left-out", ("legacy-written-out", "plain-written-out"))
        assert not live.upstream_changed("m", *forms[:2], also=forms[2])
        live.using({"m": forms})
        elsewhere.using({"m": ("eu", "eu-old")})
        assert elsewhere.upstream_changed("m", "eu", "eu-old")
        assert elsewhere.upstream_user("m") == live.owner
        with pytest.raises(UpstreamInUse):
            elsewhere.forget("m", moved=True)
        assert elsewhere.get("m") == {"t": 0.5}
        live.using({"m": forms[:2]})  # as a version that records no other forms: not this upstream's
        assert elsewhere.upstream_user("m") is None
