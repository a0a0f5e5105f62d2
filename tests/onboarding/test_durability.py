"""Onboarding across stops, kills, restarts, takeovers and a damaged store: what the store says
afterwards is what is true (nothing runs a model shown running), and a damaged store is told in one
line, not a traceback per tick."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from proxy.errors import ServiceUnavailable
from proxy.onboarding import Onboarding, Options
from proxy.providers import ProviderRegistry
from proxy.store import GradedAnswer, ModelBusy, Store, _instance

from onboarding.fakes import (FakeAsker, Answering, make_suite, model_entry, service, wait_until,
                              write_providers)
from support.read_only import make_read_only

HOST = socket.gethostname()


# -- a run stopped midway -------------------------------------------------------------------------
async def test_a_run_stopped_at_shutdown_leaves_its_model_pending_interrupted(tmp_path):
    """The proxy stops (SIGTERM) mid-run: the store says the model waits, not that it runs."""
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite(n_tasks=5, per_task=20)
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, Answering("The answer is (A).", delay=0.01),
                                suite, questions)
        await svc.sync()
        await wait_until(lambda: len(store.answered("m")) >= 4)
        await svc.stop()  # what the app's shutdown does
        progress = store.progress("m")
        assert (progress.status, progress.reason, progress.owner) == ("pending", "interrupted", None)
        assert 4 <= progress.done < 100
        assert svc.status()["models"]["m"]["status"] == "pending"


class Counting(Answering):
    """``Answering``, counting the completions it finished (each one paid for)."""

    def __init__(self, content, delay: float = 0.0):
        super().__init__(content, delay)
        self.finished = 0

    async def complete(self, call):
        reply = await super().complete(call)
        self.finished += 1
        return reply


async def _started(tmp_path, store, dispatcher, concurrency):
    """A service onboarding ``m`` (100 questions) through ``dispatcher``, synced: its run started."""
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite(n_tasks=5, per_task=20)
    registry, svc = service(config, store, dispatcher, suite, questions, concurrency=concurrency)
    await svc.sync()
    return svc


async def test_a_shutdown_stores_the_answers_to_the_questions_sent_and_asks_none_twice(tmp_path):
    """SIGTERM mid-run: no new question is sent, the ones out are answered and stored (they are
    paid for), the model is left pending ("interrupted"), and the next start asks only the rest:
    every question once over both runs."""
    with Store(tmp_path / "state") as store:
        first = Counting("The answer is (A).", delay=0.4)
        svc = await _started(tmp_path, store, first, concurrency=4)
        await wait_until(lambda: len(store.answered("m")) >= 4 and first.calls > first.finished)
        svc.begin_drain()  # the signal: before the requests' grace period, as `serve` does
        sent = first.calls
        await asyncio.wait_for(svc.drain(time.monotonic() + 10), 5)
        await svc.stop()
        assert first.calls == sent  # nothing sent after the signal
        progress = store.progress("m")
        assert len(store.answered("m")) == first.finished == first.calls  # every one stored
        assert (progress.status, progress.reason, progress.owner) == ("pending", "interrupted", None)
        await svc.sync()  # a tick after the drain starts nothing
        assert first.calls == sent and not any(not t.done() for t in svc.runs.values())

        second = Counting("The answer is (A).")
        svc = await _started(tmp_path, store, second, concurrency=4)
        await wait_until(lambda: store.progress("m").status == "done")
        assert first.calls + second.calls == 100  # none asked twice
        await svc.stop()


@pytest.mark.parametrize("how", ["deadline", "forced"])
async def test_a_shutdown_waits_for_the_questions_sent_no_longer_than_its_deadline(tmp_path, how):
    """An upstream slower than the grace period (or Ctrl+C twice) does not hold the shutdown: the
    asks out are cut, and asked again at the next start."""
    with Store(tmp_path / "state") as store:
        slow = Counting("The answer is (A).", delay=30)
        svc = await _started(tmp_path, store, slow, concurrency=2)
        await wait_until(lambda: slow.calls == 2)
        began = time.monotonic()
        if how == "deadline":
            await svc.drain(began + 0.3)
        else:
            await svc.drain(began + 60, forced=lambda: time.monotonic() > began + 0.3)
        await svc.stop()
        assert time.monotonic() - began < 3
        progress = store.progress("m")
        assert (progress.status, progress.reason, progress.done) == ("pending", "interrupted", 0)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("lease", ["released", "dead_process", "stale_elsewhere"])
@pytest.mark.parametrize("config_now", ["onboard_false", "unavailable"])
async def test_a_row_left_running_by_a_process_that_is_gone_is_shown_pending(tmp_path, lease,
                                                                             config_now):
    """A row ``running`` whose lease nobody holds (its process was killed with SIGKILL, or an
    earlier version stopped without saying so) is shown ``pending`` ("interrupted"), with the
    reason the file gives now for not onboarding it; a row another live process holds still runs."""
    config = tmp_path / "providers.yaml"
    entry = model_entry("m", "http://127.0.0.1:9", tmp_path)
    if config_now == "onboard_false":
        entry["model_info"]["onboard"] = False
    else:
        entry["litellm_params"]["api_key"] = "os.environ/SATROUTE_TEST_UNSET_KEY"
    write_providers(config, [entry])
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        with Store(tmp_path / "state") as other:  # the process that was onboarding it
            other.claim("m", suite.name)
            other.begin("m", suite.name, len(questions))
            other.record("m", GradedAnswer(questions[0].id, "A", True))
            registry, svc = service(config, store, Answering("x"), suite, questions)
            assert svc.status()["models"]["m"]["status"] == "running"  # alive, fresh: it runs
            owner, beat = {"released": (None, None),
                           "dead_process": (f"{HOST}:{_dead_pid()}:0badf00d", time.time()),
                           "stale_elsewhere": ("elsewhere:1:0badf00d", time.time() - 3600)}[lease]
            other._db.execute("UPDATE onboarding SET owner = ?, heartbeat = ?", (owner, beat))
        entry = svc.status()["models"]["m"]
        assert entry["status"] == "pending" and entry["questions_done"] == 1
        assert entry["reason"] == ("not onboarded: model_info.onboard is false"
                                   if config_now == "onboard_false" else
                                   "unavailable: litellm_params.api_key references unset "
                                   "environment variable SATROUTE_TEST_UNSET_KEY")
        seen = []
        svc.metrics = type("M", (), {"observe_onboarding": lambda self, *a: seen.append(a)})()
        svc._report(store.all_progress(svc._suite_questions()))
        assert seen == [("m", 1, 12, "pending")]


# -- who holds a lease ----------------------------------------------------------------------------
def _lease(store: Store, owner: str, heartbeat: float) -> None:
    """Model ``m`` stored ``running`` under a lease of ``owner`` with ``heartbeat``."""
    store._db.execute("INSERT INTO onboarding (model, suite, status, updated_at, owner, heartbeat) "
                      "VALUES ('m', 's', 'running', 0, ?, ?) ON CONFLICT(model) DO UPDATE SET "
                      "owner = excluded.owner, heartbeat = excluded.heartbeat", (owner, heartbeat))


def test_a_lease_of_a_dead_process_whose_pid_is_used_again_is_free(tmp_path):
    """A restarted container's proxy is PID 1 again on the same host name: its predecessor's
    lease, heartbeat still fresh, names the same pid but another process instance."""
    here = _instance()
    if here is None:
        pytest.skip("no /proc here: leases are judged by the pid alone")
    boot = here.partition("-")[0]
    with Store(tmp_path) as store, Store(tmp_path) as same_process:
        assert store.owner.startswith(f"{HOST}:{os.getpid()}:") and store.owner.endswith(f":{here}")

        def held_by(owner: str) -> None:
            _lease(store, owner, time.time())

        held_by(f"{HOST}:{os.getpid()}:0badf00d:{boot}-1")  # our pid, started long before us
        store.claim("m")  # free at once, not after LEASE_STALE_S
        assert store.progress("m").owner == store.owner
        held_by(same_process.owner)  # another Store of this very process: alive
        with pytest.raises(ModelBusy):
            store.claim("m")
        held_by(f"{HOST}:{os.getpid()}:0badf00d")  # an earlier version's owner: by the pid alone
        with pytest.raises(ModelBusy):
            store.claim("m")


def test_a_lease_whose_heartbeat_is_far_in_the_future_is_free(tmp_path):
    """A heartbeat written by a host whose clock was ahead, or before the clock was stepped
    back, says nothing about the process now: read for the first time further than the staleness
    in the future, the lease is free (else a killed process would block the model for as long); a
    little ahead (clocks a few seconds apart), it is held. One read before and rewritten since was
    written since, however far ahead: held until it goes unrefreshed for the staleness."""
    with Store(tmp_path, lease_stale_s=0.3) as store:
        _lease(store, "elsewhere:1:0badf00d", time.time() + 0.1)
        with pytest.raises(ModelBusy):
            store.claim("m")
        _lease(store, "elsewhere:1:0badf00d", time.time() + 3600)  # rewritten: its clock is ahead
        with pytest.raises(ModelBusy):
            store.claim("m")
        time.sleep(0.35)
        store.claim("m")  # not rewritten since: stale
        _lease(store, "elsewhere:2:0badf00d", time.time() + 3600)
        assert not store.held("elsewhere:2:0badf00d", time.time() + 3600)
        store.claim("m")
        assert store.progress("m").owner == store.owner


# -- a run taken over -----------------------------------------------------------------------------
async def test_a_run_taken_over_writes_nothing_more(tmp_path):
    """The process stalls (its event loop blocked) past the lease's staleness and another one
    takes the model over: the answers in flight then are not recorded, no question is asked."""
    suite, questions = make_suite()
    with Store(tmp_path) as store, Store(tmp_path, lease_stale_s=0.2) as other:
        taken: list[int] = []
        asked_after: list[str] = []

        class Stalling(FakeAsker):
            async def ask(self, model, messages, **params):
                if taken:
                    asked_after.append(self.question_of(messages).id)
                if sum(self.asked.values()) == 4 and not taken:
                    time.sleep(0.4)  # the whole process stalls
                    other.claim("m")  # meanwhile another process takes the model over
                    taken.append(len(store.answered("m")))
                return await super().ask(model, messages, **params)

        asker = Stalling(questions, lambda q: "A", delay=0.01)
        engine = Onboarding(store, suite, questions, asker, Options(concurrency=2, heartbeat_s=0.05))
        with pytest.raises(ModelBusy):
            await asyncio.wait_for(engine.run("m"), 10)
        assert taken and len(store.answered("m")) == taken[0]  # nothing recorded afterwards
        assert asked_after == []
        assert store.progress("m").owner == other.owner


async def test_a_run_checks_its_lease_before_a_question_when_its_heartbeat_is_late(tmp_path):
    """The lease is lost between two questions while the heartbeat is late: the next question is
    not asked (paid for), without waiting for the next heartbeat."""
    suite, questions = make_suite()
    now = [1000.0]
    with Store(tmp_path) as store, Store(tmp_path) as other:
        asker = FakeAsker(questions, lambda q: "A")

        def progress(model: str, done: int, total: int) -> None:
            if done == 4:  # the process stalled past the staleness, and the model was taken over
                other._db.execute("UPDATE onboarding SET owner = ?", (other.owner,))
                now[0] += 60.0

        engine = Onboarding(store, suite, questions, asker, Options(concurrency=1),
                            on_progress=progress)
        engine.clock = lambda: now[0]
        with pytest.raises(ModelBusy):
            await asyncio.wait_for(engine.run("m"), 10)
        assert sum(asker.asked.values()) == 4 and len(store.answered("m")) == 4
        assert store.progress("m").owner == other.owner


# -- a damaged store ------------------------------------------------------------------------------
def _damage(state, page: int | None = None) -> None:
    """A page of garbage in a store whose header and schema are intact (bit rot, a torn copy):
    ``page`` (counted from 1), else the last but one."""
    with Store(state) as store:
        store.begin("m", "tiny", 20)
        for i in range(8):
            store.record("m", GradedAnswer(f"mmlu_pro/{i}", "A", True, "z" * 3000))
        store.finish("other", "tiny", {"task0": 1.0})
    db = sqlite3.connect(state / "satroute.db")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    path = state / "satroute.db"
    pages = path.stat().st_size // 4096
    with open(path, "r+b") as f:
        f.seek(4096 * ((page or pages - 1) - 1))
        f.write(bytes(range(256)) * 16)


@pytest.mark.parametrize("where", ["a later page", "the header", "a table's first page"])
def test_a_damaged_store_is_refused_when_it_opens_with_one_line(tmp_path, where):
    if where == "the header":  # SQLite's "file is not a database", before any check can run
        with Store(tmp_path):
            pass
        (tmp_path / "satroute.db").write_bytes(b"garbage, not SQLite " * 300)
    else:  # a table's first page: quick_check's answer starts "*** in database main ***\n"
        _damage(tmp_path, 3 if where == "a table's first page" else None)
    for stray in ("satroute.db-wal", "satroute.db-shm"):
        (tmp_path / stray).unlink(missing_ok=True)
    with pytest.raises(sqlite3.DatabaseError) as refused:
        Store(tmp_path)
    message = str(refused.value)
    assert "satroute.db is damaged" in message and "backup" in message and "\n" not in message
    assert "***" not in message and "-wal" not in message
    if where == "a table's first page":
        assert "is damaged: Page 3: " in message
    # a backup copied over satroute.db alone, beside the WAL a killed proxy left: that WAL is said
    (tmp_path / "satroute.db-wal").write_bytes(b"not the WAL of this file" * 100)
    with pytest.raises(sqlite3.DatabaseError, match="satroute.db-wal and satroute.db-shm beside it are "
                                                    "the old file's: move them away too; restore"):
        Store(tmp_path)


@pytest.mark.parametrize("made_by", ["the proxy", "satroute backup"])
def test_a_store_that_cannot_be_written_is_refused_when_it_opens_with_one_line(tmp_path, monkeypatch, made_by):
    """A satroute.db owned by another user (restored by root, a read-only volume): SQLite opens
    it read-only without a word, so every answer and the routing log would be lost later. A copy
    `satroute backup` made (restored with `docker compose cp`, as root) is in another journal
    mode: switching it to WAL is its first write, which failed with SQLite's bare words."""
    from proxy.backup import backup

    with Store(tmp_path / "state") as store:
        store.begin("m", "tiny", 20)
    folder = tmp_path / "state"
    if made_by == "satroute backup":
        folder = backup(folder / "satroute.db", tmp_path / "bk").parent
    make_read_only(monkeypatch, folder / "satroute.db")
    with pytest.raises(sqlite3.OperationalError) as refused:
        Store(folder)
    message = str(refused.value)
    assert "satroute.db cannot be written" in message and "write access" in message
    assert "\n" not in message


async def test_a_store_that_cannot_be_read_answers_503_and_the_loop_logs_it_once(tmp_path, caplog):
    """Damage met after start-up: the admin status is a 503 with the reason, and the watch loop
    logs the error once (no traceback per tick), and once more when it works again."""
    caplog.set_level(logging.INFO, logger="satroute.onboarding")
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path, profile=True)])
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, Answering("x"), suite, questions)
        readable = store.all_progress

        def damaged(*args, **kwargs):
            raise sqlite3.DatabaseError("database disk image is malformed")

        store.all_progress = damaged
        with pytest.raises(ServiceUnavailable) as unavailable:
            svc.status()
        assert unavailable.value.status == 503 and "malformed" in unavailable.value.message
        watch = asyncio.create_task(svc.watch(0.01))
        try:
            await asyncio.sleep(0.2)  # many ticks
            store.all_progress = readable
            await asyncio.sleep(0.05)
        finally:
            watch.cancel()
        failed = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(failed) == 1 and "malformed" in failed[0].getMessage()
        assert failed[0].exc_info is None
        assert any("checks work again" in r.getMessage() for r in caplog.records)
        assert svc.status()["models"]["m"]["status"] == "done"


def test_a_damaged_stored_profile_is_skipped_with_one_warning(tmp_path, caplog):
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry(n, "http://127.0.0.1:9", tmp_path) for n in ("good", "bad")])
    with Store(tmp_path / "state") as store:
        for name in ("good", "bad"):
            store.finish(name, "tiny", {"task0": 1.0, "task1": 0.0})
        store._db.execute("UPDATE profiles SET tasks = '{\"task0\": 1.0, \"tas' WHERE model = 'bad'")
        registry = ProviderRegistry(config, dict, store)  # start-up: no traceback
        registry.refresh_profiles()
        assert registry.snapshot.models["good"].profile == {"task0": 1.0, "task1": 0.0}
        assert registry.snapshot.models["bad"].profile is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "stored profile of bad is damaged" in warnings[0]


async def test_a_shutdown_says_which_asks_out_were_answered_but_could_not_be_stored(tmp_path, caplog):
    """During a store outage (a full disk) the shutdown waited its grace period for answers in
    hand, then called them "not answered": paid for, asked again at the next start, and the log
    pointed at the upstream instead of the disk."""
    with Store(tmp_path / "state") as store:
        answering = Counting("The answer is (A).", delay=0.01)
        svc = await _started(tmp_path, store, answering, concurrency=2)
        await wait_until(lambda: len(store.answered("m")) >= 2)
        record = store.record

        def full(*args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")

        store.record = full
        await wait_until(lambda: svc._engine.answers_unstored() == 2)
        with caplog.at_level(logging.WARNING, logger="satroute.onboarding"):
            await svc.drain(time.monotonic() + 0.3)
        store.record = record
        await svc.stop()
    assert ("onboarding: 2 answers received could not be stored (the state store refuses writes) "
            "before the shutdown's deadline") in caplog.text
    assert "were not answered" not in caplog.text
