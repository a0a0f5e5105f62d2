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
