"""`satroute backup`: a copy of the state store that holds what the running proxy wrote last."""
from __future__ import annotations

import shutil
import stat

from proxy.cli import main
from proxy.localserver import KEY_FILE
from proxy.store import GradedAnswer, Store


def test_a_backup_taken_under_a_running_proxy_holds_its_latest_writes(tmp_path, capsys):
    """The store's latest writes sit in satroute.db-wal while the proxy runs: a copy of
    satroute.db alone lacks them (answers paid for, asked again after a restore)."""
    state = tmp_path / "state"
    with Store(state) as running:
        running.begin("m", "suite", total=2)
        running.record("m", GradedAnswer("q1", "A", True))
        running.finish("m", "suite", {"t": 0.5})
        (state / KEY_FILE).write_text("secret")
        (state / KEY_FILE).chmod(0o600)
        shutil.copy(state / "satroute.db", tmp_path / "plain.db")
        assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
        running.record("m", GradedAnswer("q2", "B", False))  # after the copy: not in it
    assert "backed up" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "bk").iterdir()) == [KEY_FILE, "satroute.db"]
    assert stat.S_IMODE((tmp_path / "bk" / KEY_FILE).stat().st_mode) == 0o600
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(tmp_path / "bk" / "satroute.db", restored / "satroute.db")
    with Store(restored) as store:
        assert store.get("m") == {"t": 0.5} and store.answered("m") == {"q1"}
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(tmp_path / "plain.db", plain / "satroute.db")
    with Store(plain) as store:  # what `cp satroute.db` would have kept
        assert store.get("m") is None


def test_a_backup_that_cannot_be_made_says_why_and_makes_nothing(tmp_path, capsys):
    state = tmp_path / "state"
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 2
    assert "no state store at" in capsys.readouterr().err
    assert not state.exists() and not (tmp_path / "bk").exists()
    with Store(state):
        pass
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "empty")]) == 0



def test_a_backup_restored_as_documented_is_what_the_store_holds(tmp_path):
    """docs/onboarding.md: stop the proxy, move satroute.db-wal and -shm away (a killed proxy
    leaves them, and SQLite would apply the old file's WAL to the backup), copy the backup in."""
    state = tmp_path / "state"
    with Store(state) as store:
        store.begin("m", "suite", total=2)
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    crashed = tmp_path / "crashed"
    with Store(state) as store:
        for i in range(300):
            store.record("m", GradedAnswer(f"q{i}", "A" * 200, True))
        store.finish("m", "suite", {"t": 0.5})
        shutil.copytree(state, crashed)  # as the killed process left it: with its WAL
    for stray in ("satroute.db-wal", "satroute.db-shm"):
        (crashed / stray).unlink()
    shutil.copy(tmp_path / "bk" / "satroute.db", crashed / "satroute.db")
    with Store(crashed) as store:
        assert store.progress("m").status == "running" and store.answered("m") == set()
