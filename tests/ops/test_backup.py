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


def test_a_backup_that_fails_midway_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """A full disk or Ctrl+C during the copy left a hidden partial file, and the same command
    then refused the folder as not empty."""
    import sqlite3

    import pytest

    from proxy import backup

    state = tmp_path / "state"
    with Store(state):
        pass
    real = backup._backup

    def fails(src, part, error):
        part.write_bytes(b"half a copy")
        src.close()
        raise error

    class Interrupted(BaseException):  # as Ctrl+C's KeyboardInterrupt, which pytest takes for its own
        pass

    for error in (sqlite3.OperationalError("database or disk is full"), Interrupted()):
        monkeypatch.setattr(backup, "_backup", lambda src, part, error=error: fails(src, part, error))
        if isinstance(error, Interrupted):
            with pytest.raises(Interrupted):
                main(["backup", "--state-dir", str(state), str(tmp_path / "bk")])
        else:
            assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 2
            assert "disk is full" in capsys.readouterr().err
        assert not (tmp_path / "bk").exists()
    (tmp_path / "mine").mkdir()  # a folder the admin made: kept, emptied of the attempt
    monkeypatch.setattr(backup, "_backup", lambda src, part: fails(src, part, sqlite3.OperationalError("full")))
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    monkeypatch.setattr(backup, "_backup", real)
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    assert stat.S_IMODE((tmp_path / "bk").stat().st_mode) == 0o700


def test_a_stopped_proxy_s_store_on_a_read_only_mount_is_copied(tmp_path, monkeypatch):
    """SQLite cannot open a WAL database read-write where it cannot make its -shm: with no WAL
    left (the proxy stopped cleanly) and the folder not writable, it is read as immutable."""
    import sqlite3

    from proxy import backup

    state = tmp_path / "state"
    with Store(state) as store:
        store.begin("m", "suite", total=1)
        store.finish("m", "suite", {"t": 0.5})
    assert not (state / "satroute.db-wal").exists()
    real_connect = sqlite3.connect

    def read_only(database, *args, **kwargs):
        if str(database) == str(state / "satroute.db"):
            raise sqlite3.OperationalError("unable to open database file")
        return real_connect(database, *args, **kwargs)

    monkeypatch.setattr(backup.sqlite3, "connect", read_only)
    monkeypatch.setattr(backup.os, "access", lambda path, mode: False)
    copied = backup.backup(state / "satroute.db", tmp_path / "bk")
    monkeypatch.undo()
    with Store(copied.parent) as store:
        assert store.get("m") == {"t": 0.5}
