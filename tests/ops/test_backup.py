"""`satroute backup`: a copy of the state store that holds what the running proxy wrote last."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import stat
import time
from pathlib import Path

import pytest

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
    from proxy import backup

    state = tmp_path / "state"
    with Store(state):
        pass
    real = backup._backup

    def fails(src, part, error):
        part.write_bytes(b"half a copy")
        src.close()
        raise error

    def terminated(src, part):  # SIGTERM mid-copy: Python's default would leave the part
        part.write_bytes(b"half a copy")
        src.close()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    for error, status, said in ((sqlite3.OperationalError("database or disk is full"), 2, "disk is full"),
                                (KeyboardInterrupt(), 130, "interrupted; nothing was kept at"),
                                (None, 143, "interrupted; nothing was kept at")):
        monkeypatch.setattr(backup, "_backup", terminated if error is None else
                            lambda src, part, error=error: fails(src, part, error))
        assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk" / "in" / "new")]) == status
        err = capsys.readouterr().err
        assert said in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bk").exists()  # nor the folders made above it
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    (tmp_path / "mine").mkdir(mode=0o750)  # a folder the admin made: kept, emptied of the attempt
    monkeypatch.setattr(backup, "_backup", lambda src, part: fails(src, part, sqlite3.OperationalError("full")))
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    assert stat.S_IMODE((tmp_path / "mine").stat().st_mode) == 0o750
    monkeypatch.setattr(backup, "_backup", real)
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    assert stat.S_IMODE((tmp_path / "bk").stat().st_mode) == 0o700
    # a folder the admin made, readable by others: made owner-only, the copy in it too
    (tmp_path / "open").mkdir(mode=0o755)
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "open")]) == 0
    assert stat.S_IMODE((tmp_path / "open").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "open" / "satroute.db").stat().st_mode) == 0o600


def test_a_backup_into_a_folder_others_can_swap_files_in_is_refused(tmp_path, capsys):
    """Another local user who made the (predictable) folder, or may write to it, could replace the
    key and the copy with theirs, which a restore would then install."""
    state = tmp_path / "state"
    with Store(state):
        pass
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o777)
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "shared")]) == 2
    assert "can be written by others than its owner" in capsys.readouterr().err
    assert not any((tmp_path / "shared").iterdir())
    if os.geteuid() == 0:
        (tmp_path / "theirs").mkdir(mode=0o700)
        os.chown(tmp_path / "theirs", 10002, 10002)
        (tmp_path / "link").symlink_to(tmp_path / "theirs")
        for dest in ("theirs", "link"):
            assert main(["backup", "--state-dir", str(state), str(tmp_path / dest)]) == 2
            assert "belongs to another user (uid 10002)" in capsys.readouterr().err
        assert not any((tmp_path / "theirs").iterdir())


def test_two_backups_into_one_folder_never_delete_each_other_s_copy(tmp_path, monkeypatch, capsys):
    """Two backups started together into one new folder (a cron job and an admin) both found it
    empty: the one that failed removed the other's finished copy, which had said "backed up"."""
    from proxy import backup

    state = tmp_path / "state"
    with Store(state) as store:
        store.finish("m", "suite", {"t": 0.5})
    dest = tmp_path / "bk"
    real_make = backup.make_folders

    def another_starts_meanwhile(folder):  # after this one found the folder free
        made = real_make(folder)
        (dest / ".satroute.db.part").write_bytes(b"another backup at work")
        return made

    monkeypatch.setattr(backup, "make_folders", another_starts_meanwhile)
    assert main(["backup", "--state-dir", str(state), str(dest)]) == 2
    assert "another backup is being written to" in capsys.readouterr().err
    assert (dest / ".satroute.db.part").read_bytes() == b"another backup at work"
    (dest / ".satroute.db.part").unlink()
    monkeypatch.setattr(backup, "make_folders", real_make)
    real = backup._backup

    def another_finishes_meanwhile(src, part):
        real(src, part)
        real(sqlite3.connect(state / "satroute.db"), dest / "theirs")
        (dest / "theirs").rename(dest / "satroute.db")

    monkeypatch.setattr(backup, "_backup", another_finishes_meanwhile)
    assert main(["backup", "--state-dir", str(state), str(dest)]) == 2
    assert "another backup was written to" in capsys.readouterr().err
    assert sorted(p.name for p in dest.iterdir()) == ["satroute.db"]  # theirs, whole
    with Store(dest) as copy:
        assert copy.get("m") == {"t": 0.5}


def test_a_backup_into_a_symbolic_link_to_nothing_says_so(tmp_path, capsys):
    state = tmp_path / "state"
    with Store(state):
        pass
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "link")]) == 2
    assert "is a symbolic link to nothing" in capsys.readouterr().err


def _on_a_read_only_mount(monkeypatch, folder: Path) -> None:
    """``folder`` as a read-only mount shows it to the copy: SQLite cannot open its WAL database
    read-write (it cannot make the -shm), and the folder cannot be written."""
    from proxy import backup

    real_connect = sqlite3.connect

    def read_only(database, *args, **kwargs):
        if str(database) == str(folder / "satroute.db"):
            raise sqlite3.OperationalError("unable to open database file")
        return real_connect(database, *args, **kwargs)

    monkeypatch.setattr(backup.sqlite3, "connect", read_only)
    monkeypatch.setattr(backup.os, "access", lambda path, mode: Path(path) != folder)


def test_a_stopped_proxy_s_store_on_a_read_only_mount_is_copied(tmp_path, monkeypatch):
    """SQLite cannot open a WAL database read-write where it cannot make its -shm: with no WAL
    left (the proxy stopped cleanly) and the folder not writable, it is read as immutable."""
    from proxy import backup

    state = tmp_path / "state"
    with Store(state) as store:
        store.begin("m", "suite", total=1)
        store.finish("m", "suite", {"t": 0.5})
    assert not (state / "satroute.db-wal").exists()
    _on_a_read_only_mount(monkeypatch, state)
    copied = backup.backup(state / "satroute.db", tmp_path / "bk")
    monkeypatch.undo()
    with Store(copied.parent) as store:
        assert store.get("m") == {"t": 0.5}


def _stored(state) -> tuple:
    with Store(state) as store:
        return store.progress("m").status, store.answered("m"), store.get("m")


def test_restore_puts_a_backup_back_over_a_killed_proxy_s_files(tmp_path, capsys):
    """`satroute restore` does the documented steps: the killed proxy's WAL is set aside with the
    file it belongs to (SQLite would apply it to the restored one), the copy goes in under its
    name at once, and the key with it, owner-only. Nothing is deleted."""
    state = tmp_path / "state"
    with Store(state) as store:
        store.begin("m", "suite", total=2)
        store.record("m", GradedAnswer("q0", "A", True))
    (state / KEY_FILE).write_text("the backup's key")
    (state / KEY_FILE).chmod(0o600)
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    crashed = tmp_path / "crashed"
    with Store(state) as store:
        for i in range(1, 300):
            store.record("m", GradedAnswer(f"q{i}", "A" * 200, True))
        store.finish("m", "suite", {"t": 0.5})
        shutil.copytree(state, crashed)  # as the killed process left it: with its WAL
    assert (crashed / "satroute.db-wal").stat().st_size > 0
    (crashed / KEY_FILE).write_text("a newer key")
    capsys.readouterr()
    assert main(["restore", "--state-dir", str(crashed), str(tmp_path / "bk")]) == 0
    out = capsys.readouterr().out
    assert f"into {crashed / 'satroute.db'} (0 profiles, 1 answer of 1 model, with {KEY_FILE})" in out
    assert _stored(crashed) == ("running", {"q0"}, None)
    assert (crashed / KEY_FILE).read_text() == "the backup's key"
    assert stat.S_IMODE((crashed / KEY_FILE).stat().st_mode) == 0o600
    aside = [p for p in crashed.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and f"the files it replaced are in {aside[0]}" in out
    assert sorted(p.name for p in aside[0].iterdir()) == sorted(
        [KEY_FILE, "satroute.db", "satroute.db-wal", "satroute.db-shm", ".restore-id"])
    assert not [p for p in crashed.iterdir() if p.name.endswith(".restoring")]


def test_restore_is_refused_while_a_process_has_the_store_open(tmp_path, capsys):
    """A copy put in place under a running proxy (`cp` over the file: the same inode, not seen)
    was overwritten again by the proxy's WAL, or left torn: answers asked and paid for twice."""
    state = tmp_path / "state"
    with Store(state) as store:
        store.finish("m", "suite", {"t": 0.5})
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    with Store(state) as running:
        running.record("m", GradedAnswer("q1", "A", True))
        before = (state / "satroute.db").stat().st_ino
        assert main(["restore", "--state-dir", str(state), str(tmp_path / "bk")]) == 2
        assert ("is in use by a proxy, `satroute onboard` or another `satroute restore` on this host"
                in capsys.readouterr().err)
        assert (state / "satroute.db").stat().st_ino == before
        assert not [p for p in state.iterdir() if p.name.startswith(("replaced-", "."))]
        assert running.answered("m") == {"q1"}
    assert main(["restore", "--state-dir", str(state), str(tmp_path / "bk")]) == 0  # stopped: done


def test_a_store_opening_waits_for_a_restore_under_way(tmp_path, monkeypatch):
    """A proxy started while a restore puts the file in place opens the restored store, not the
    one being replaced; past RESTORE_WAIT_S it says why it cannot start."""
    import threading

    from proxy import store as store_module
    from proxy.store import lock_folder

    state = tmp_path / "state"
    state.mkdir()
    held = lock_folder(state, exclusive=True)
    assert held is not None
    threading.Timer(0.3, os.close, (held,)).start()
    began = time.monotonic()
    with Store(state):
        assert time.monotonic() - began >= 0.25
    held = lock_folder(state, exclusive=True)
    monkeypatch.setattr(store_module, "RESTORE_WAIT_S", 0.1)
    try:
        with pytest.raises(sqlite3.OperationalError, match="is being restored .* still locked after"):
            Store(state)
    finally:
        os.close(held)
    with Store(state), Store(state):  # stores share it
        pass


def test_restore_refuses_what_it_cannot_put_back_and_changes_nothing(tmp_path, capsys, monkeypatch):
    from proxy import restore

    state = tmp_path / "state"
    with Store(state) as store:
        store.finish("m", "suite", {"t": 0.5})
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    for src, said in (("nothing", "no satroute.db at"), ("junk.db", "is not a state store"),
                      ("other.db", "is not a state store (no onboarding table)"),
                      ("state", "is the state store itself")):
        assert main(["restore", "--state-dir", str(state), str(tmp_path / src)]) == 2
        assert said in capsys.readouterr().err, src
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 0

    def interrupted(source, part):
        part.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(restore, "copy", interrupted)
    capsys.readouterr()
    assert main(["restore", "--state-dir", str(state), str(tmp_path / "bk")]) == 130
    assert "interrupted;" in capsys.readouterr().err
    assert sorted(p.name for p in state.iterdir()) == ["satroute.db"]
    assert _stored(state)[2] == {"t": 0.5}


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files another owner takes root")
def test_restore_run_as_root_gives_the_files_the_state_folder_s_owner(tmp_path):
    """Under compose the proxy runs as uid 10001 and a restore is run as root: files left to
    root are refused by the proxy at start."""
    state = tmp_path / "state"
    with Store(state) as store:
        store.finish("m", "suite", {"t": 0.5})
    (state / KEY_FILE).write_text("k")
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    os.chown(state, 10001, 10001)
    assert main(["restore", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    for name in ("satroute.db", KEY_FILE):
        assert ((state / name).stat().st_uid, (state / name).stat().st_gid) == (10001, 10001), name


def test_a_restore_interrupted_once_it_replaces_files_finishes_first(tmp_path, monkeypatch, capsys):
    """SIGTERM after the store had been set aside, before the copy had its name: the folder was
    left with no database, the next start made an empty one (everything onboarded and paid for
    again), and the command said the folder was as it was."""
    from proxy import restore

    state = tmp_path / "state"
    with Store(state) as store:
        store.finish("m", "suite", {"t": 0.5})
    (state / KEY_FILE).write_text("k")
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    with Store(state) as store:
        store.record("m", GradedAnswer("q-after", "A", True))
    real = restore._snapshot

    def terminated_meanwhile(*args):
        aside = real(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # delivered here, were it not held off
        return aside

    monkeypatch.setattr(restore, "_snapshot", terminated_meanwhile)
    assert main(["restore", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    assert "restored " in capsys.readouterr().out
    assert _stored(state)[1:] == (set(), {"t": 0.5})
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_what_a_restore_replaces_is_copied_whole_before_anything_changes(tmp_path, monkeypatch, capsys):
    """A kill between two steps must never leave the folder without its database, nor a
    replaced-<time> folder without the WAL that goes with its database; a failure while copying
    them (no hard links here, and a full disk) changes nothing, and says so as any refusal does."""
    from proxy import restore

    state = tmp_path / "state"
    state.mkdir()
    files = ("satroute.db", "satroute.db-wal", "satroute.db-shm", KEY_FILE)
    for name in files:
        (state / name).write_text(name)
    aside = restore._snapshot(state, with_key=True, restore_id="r1")
    assert aside.name.startswith("replaced-")
    assert sorted(p.name for p in aside.iterdir()) == sorted(files + (".restore-id",))
    assert (aside / ".restore-id").read_text() == "r1"
    assert sorted(p.name for p in state.iterdir() if p.is_file()) == sorted(files)  # unchanged
    assert (aside / "satroute.db-wal").read_text() == "satroute.db-wal"
    shutil.rmtree(aside)
    with Store(tmp_path / "live") as store:
        store.finish("m", "suite", {"t": 0.5})
    assert main(["backup", "--state-dir", str(tmp_path / "live"), str(tmp_path / "bk")]) == 0

    def no_room(src, dst, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(restore.os, "link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "no links")))
    monkeypatch.setattr(restore.shutil, "copy2", no_room)
    capsys.readouterr()
    assert main(["restore", "--state-dir", str(state), str(tmp_path / "bk")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in state.iterdir()) == sorted(files)  # as it was: no part, no folder


def test_a_store_refuses_to_start_beside_a_restore_that_was_killed(tmp_path, capsys):
    """A restore killed between its steps leaves its copy under the temporary name: a proxy
    started then would run on a store the admin meant to replace, and write to it."""
    from proxy.store import RESTORING, RESTORING_ID

    state = tmp_path / "state"
    with Store(state) as store:
        store.finish("m", "suite", {"t": 0.5})
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    assert main(["restore", "--state-dir", str(state), str(tmp_path / "bk")]) == 0  # an earlier one
    [earlier] = state.glob("replaced-*")
    assert not (state / RESTORING_ID).exists()  # a restore that ended leaves no id behind
    (state / RESTORING).write_bytes(b"half a copy")  # killed while copying: nothing replaced yet
    (state / RESTORING_ID).write_text("killed-one")
    os.utime(earlier)  # newer than the part: a restore of that folder opens its database there
    with pytest.raises(sqlite3.OperationalError, match="killed before it ended, before it changed anything: "
                                                       "run it again, or delete .satroute.db.restoring"):
        Store(state)
    taken = state / "replaced-20991231T000000Z"  # killed after it copied what it replaces
    taken.mkdir()
    (taken / ".restore-id").write_text("killed-one")
    with pytest.raises(sqlite3.OperationalError, match=f"while it replaced the store: run it again to finish "
                                                       f"it, or `satroute restore {taken}`"):
        Store(state)
    assert main(["restore", "--state-dir", str(state), str(tmp_path / "bk")]) == 0  # run again
    assert not (state / RESTORING).exists() and _stored(state)[2] == {"t": 0.5}
    assert earlier.exists()


def test_a_restore_from_a_read_only_copy_and_one_that_cannot_be_read(tmp_path, monkeypatch, capsys):
    """A stopped proxy's store on a read-only mount (a snapshot) is restored as it is backed up
    (read as immutable); one this user cannot read says how to run the restore."""
    from proxy import restore

    snap = tmp_path / "snap"
    with Store(snap) as store:
        store.finish("m", "suite", {"t": 0.5})
    _on_a_read_only_mount(monkeypatch, snap)
    state = tmp_path / "state"
    assert main(["restore", "--state-dir", str(state), str(snap / "satroute.db")]) == 0
    monkeypatch.undo()
    assert _stored(state)[2] == {"t": 0.5}
    monkeypatch.setattr(restore.os, "access", lambda path, mode: False)
    assert main(["restore", "--state-dir", str(state), str(snap)]) == 2
    assert "cannot be read by this user" in capsys.readouterr().err


def test_a_backup_stopped_as_its_copy_gets_its_name_keeps_it_whole(tmp_path, monkeypatch, capsys):
    """SIGTERM between the link that names the copy and the part's removal: the command said
    nothing was kept, and left the copy, without its key, in the way of the next attempt."""
    from proxy import backup

    state = tmp_path / "state"
    with Store(state) as store:
        store.finish("m", "suite", {"t": 0.5})
    (state / KEY_FILE).write_text("k")
    real = backup.give_name

    def terminated_meanwhile(part, target, taken):
        os.link(part, target)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        target.unlink()
        real(part, target, taken)

    monkeypatch.setattr(backup, "give_name", terminated_meanwhile)
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    assert sorted(p.name for p in (tmp_path / "bk").iterdir()) == [KEY_FILE, "satroute.db"]


def test_the_database_is_the_last_file_a_restore_puts_in_place(tmp_path, monkeypatch):
    """Its part is what tells a store a restore did not finish: with the key renamed after it, a
    restore killed between the two left the restored database running with the replaced key (the
    stored failures keyed with another one), and nothing said so."""
    state = tmp_path / "state"
    with Store(state) as store:
        store.finish("m", "suite", {"t": 0.5})
    (state / KEY_FILE).write_text("k")
    assert main(["backup", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    renamed, real = [], Path.replace

    def replace(self, target):
        renamed.append(Path(target).name)
        return real(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    assert main(["restore", "--state-dir", str(state), str(tmp_path / "bk")]) == 0
    assert renamed[-2:] == [KEY_FILE, "satroute.db"]
