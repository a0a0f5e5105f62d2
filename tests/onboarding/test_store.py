"""The state store: answers committed one by one, profiles only with `done`, crash safety."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.store import GradedAnswer, RouteEntry, Store

REPO = Path(__file__).resolve().parents[2]


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


def test_spend_is_recorded_with_each_answer(tmp_path):
    with Store(tmp_path) as s:
        s.begin("m", "suite", total=3, upstream="fp")
        assert s.record("m", GradedAnswer("q1", "A", True), cost=0.25)
        assert s.record("m", GradedAnswer("q2", "B", False), cost=0.5)
        assert not s.record("m", GradedAnswer("q1", "A", True), cost=9.0)  # stored before
        assert s.spent("m") == 0.75 and s.progress("m").to_json()["spent_usd"] == 0.75
        s.begin("m", "suite", total=3)  # resumed: spend and upstream kept
        assert s.spent("m") == 0.75 and not s.upstream_changed("m", "fp")
        s.forget("m")
        assert s.spent("m") == 0.0
