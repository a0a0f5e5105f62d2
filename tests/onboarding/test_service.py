"""OnboardingService without HTTP: crashes, bad settings and edits of providers.yaml mid-run."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import sqlite3
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest

from proxy.dispatch import Reply
from proxy.onboarding import Onboarding, Options
from proxy.onboarding_service import DispatchAsker, OnboardingService
from proxy.providers import ProviderRegistry, legacy_fingerprint, upstream_fingerprint
from proxy.store import GradedAnswer, Store

from onboarding.fakes import Answering, make_suite, model_entry, service, spawn, wait_until, write_providers


async def test_a_crash_in_a_run_is_recorded_as_failed(tmp_path, monkeypatch):
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, Answering("x"), suite, questions)

        def boom(*args, **kw):
            raise RuntimeError("a bug")

        monkeypatch.setattr("proxy.onboarding.extract_answer", boom)
        await svc.sync()
        await asyncio.wait_for(svc.runs["m"], 10)
        entry = svc.status()["models"]["m"]
        assert entry["status"] == "failed" and "RuntimeError: a bug" in entry["reason"]
        await svc.sync()  # failed with this very file: not started again until it changes
        assert svc.runs["m"].done()


async def test_content_parts_onboard_through_the_service(tmp_path):
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite()
    parts = [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]},
             {"type": "text", "text": "The answer is (A)."}]
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, Answering(parts), suite, questions)
        await svc.sync()
        await asyncio.wait_for(svc.runs["m"], 10)
        assert store.progress("m").status == "done"
        assert {a.letter for a in store.answers("m")} == {"A"}


async def test_models_on_one_provider_account_are_asked_within_one_concurrency(tmp_path):
    """Each model had onboarding_concurrency questions out: three models on one account, three
    times as many as the account was meant to get. Another account gets its own."""
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry(m, base, tmp_path) for m, base in (
        ("m1", "http://127.0.0.1:9/v1"), ("m2", "http://127.0.0.1:9/v1"), ("m3", "http://127.0.0.1:9/v1/"),
        ("other", "http://127.0.0.1:10/v1"))])
    suite, questions = make_suite()

    class Counting(Answering):
        def __init__(self, content, delay):
            super().__init__(content, delay)
            self.out, self.peak = {}, {}  # by api_base

        async def complete(self, call):
            base = call.targets[0].api_base.rstrip("/")
            self.out[base] = self.out.get(base, 0) + 1
            self.peak[base] = max(self.peak.get(base, 0), self.out[base])
            try:
                return await super().complete(call)
            finally:
                self.out[base] -= 1

    dispatcher = Counting("The answer is (A).", delay=0.01)
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, dispatcher, suite, questions, concurrency=2)
        await svc.sync()
        await asyncio.wait_for(asyncio.gather(*svc.runs.values()), 10)
        assert {store.progress(m).status for m in ("m1", "m2", "m3", "other")} == {"done"}
    assert dispatcher.peak == {"http://127.0.0.1:9/v1": 2, "http://127.0.0.1:10/v1": 2}


async def test_a_misspelt_suite_fails_with_a_clear_reason(tmp_path):
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    with Store(tmp_path / "state") as store:
        registry = ProviderRegistry(config, dict, store)
        svc = OnboardingService(store, registry, None, spawn, suite="mmlu-pro", hub=False)
        await svc.sync()
        await asyncio.wait_for(svc.runs["m"], 10)
        entry = svc.status()["models"]["m"]
        assert entry["status"] == "failed"
        assert "'mmlu-pro'" in entry["reason"] and "no aptitude suite" in entry["reason"]


async def test_a_model_removed_mid_run_resumes_when_it_is_put_back(tmp_path):
    """The ask that finds the model gone cancels the run (no failure stamped on the file), so
    putting the same file back resumes the test where it stopped."""
    config = tmp_path / "providers.yaml"
    both = [model_entry("m", "http://127.0.0.1:9", tmp_path),
            model_entry("other", "http://127.0.0.1:9", tmp_path, profile=True)]
    write_providers(config, both)
    original = config.read_bytes()
    suite, questions = make_suite(n_tasks=5, per_task=20)
    dispatcher = Answering("The answer is (A).", delay=0.01)
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, dispatcher, suite, questions, concurrency=4)
        await svc.sync()
        await wait_until(lambda: len(store.answered("m")) >= 10)
        write_providers(config, both[1:])
        registry.reload()  # the service has not synced yet: the next ask finds the model gone
        run = svc.runs["m"]
        await asyncio.wait_for(run, 10)
        assert not run.cancelled()
        progress = store.progress("m")
        assert progress.status == "pending" and "no longer in providers.yaml" in progress.reason
        stopped_at = progress.done
        assert stopped_at < 100
        await svc.sync()
        config.write_bytes(original)  # put back unchanged
        registry.reload()
        await svc.sync()
        assert not svc.runs["m"].done()
        await asyncio.wait_for(svc.runs["m"], 20)
        progress = store.progress("m")
        assert progress.status == "done" and progress.done == 100
        assert dispatcher.calls <= 100 + 4  # resumed: at most the in-flight ones asked again
        await svc.stop()


class ByUpstream:
    """A dispatcher answering "(A)" from upstream model openai/tiny, "(B)" from any other."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls = delay, {}

    async def complete(self, call):
        target = call.targets[0]
        self.calls[target.model] = self.calls.get(target.model, 0) + 1
        await asyncio.sleep(self.delay)
        letter = "A" if target.model == "openai/tiny" else "B"
        body = {"choices": [{"message": {"content": f"The answer is ({letter})."}}]}
        return Reply(model=target.name, body=orjson.dumps(body))


def pointing_at(upstream, tmp_path, api_base="http://127.0.0.1:9"):
    entry = model_entry("m", api_base, tmp_path)
    entry["litellm_params"]["model"] = upstream
    return [entry]


def two_proxies_configs(tmp_path):
    """The providers.yaml of two proxies pointing `m` at two upstreams: (the old's, the new's)."""
    old_config, new_config = tmp_path / "old.yaml", tmp_path / "new.yaml"
    write_providers(old_config, pointing_at("openai/tiny", tmp_path, "http://127.0.0.1:9"))
    write_providers(new_config, pointing_at("openai/tiny", tmp_path, "http://127.0.0.2:9"))
    return old_config, new_config


def stop_onboarding(old_config, old_registry, tmp_path):
    """The old proxy's `m` set to `onboard: false`, on the same upstream, and reloaded."""
    not_onboarded = pointing_at("openai/tiny", tmp_path, "http://127.0.0.1:9")
    not_onboarded[0]["model_info"]["onboard"] = False
    write_providers(old_config, not_onboarded)
    old_registry.reload()


async def test_another_upstream_under_the_same_name_is_onboarded_again(tmp_path):
    config = tmp_path / "providers.yaml"
    write_providers(config, pointing_at("openai/tiny", tmp_path))
    suite, questions = make_suite()
    dispatcher = ByUpstream()
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, dispatcher, suite, questions)
        await svc.sync()
        await asyncio.wait_for(svc.runs["m"], 10)
        assert registry.snapshot.models["m"].profile is not None
        await svc.sync()  # nothing changed: nothing asked again
        assert svc.runs["m"].done() and dispatcher.calls == {"openai/tiny": 12}
        for edit in (pointing_at("openai/big", tmp_path),  # another model ...
                     pointing_at("openai/big", tmp_path, "http://127.0.0.2:9")):  # ... or server
            write_providers(config, edit)
            registry.reload()
            await svc.sync()
            assert registry.snapshot.models["m"].profile is None  # the old profile is not used
            await asyncio.wait_for(svc.runs["m"], 10)
            assert store.progress("m").status == "done"
            assert {a.letter for a in store.answers("m")} == {"B"}
        assert dispatcher.calls == {"openai/tiny": 12, "openai/big": 24}


async def test_the_spend_of_answers_forgotten_for_another_upstream_is_kept_and_shown(tmp_path, caplog):
    """An edit of api_base forgets the answers and profile, not what they cost: the log line says
    so, the status shows it, and the run on the new upstream adds to it."""
    config = tmp_path / "providers.yaml"

    def priced(api_base):
        entries = pointing_at("openai/tiny", tmp_path, api_base)
        entries[0]["model_info"] = {"input_price_per_mtok": 100.0, "output_price_per_mtok": 100.0}
        return entries

    write_providers(config, priced("http://127.0.0.1:9"))
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, ByUpstream(), suite, questions)
        await svc.sync()
        await asyncio.wait_for(svc.runs["m"], 10)
        first = store.spent("m")
        write_providers(config, priced("http://localhost:9"))
        registry.reload()
        with caplog.at_level(logging.WARNING, logger="satroute.onboarding"):
            await svc.sync()
        assert (f"onboarding m: its upstream changed; its answers and profile were forgotten; the "
                f"${first:.2f} spent on it is kept, and counts against the spend cap; onboarding it "
                "again") in caplog.text
        await asyncio.wait_for(svc.runs["m"], 10)
        shown = svc.status()["models"]["m"]
        assert shown["status"] == "done" and shown["spent_forgotten_usd"] == round(first, 4)
        assert shown["spent_usd"] == pytest.approx(2 * first, abs=1e-4)


async def test_two_proxies_pointing_a_model_at_two_upstreams_keep_each_other_s_profile(tmp_path, caplog):
    """Two proxies on one state directory, each one's providers.yaml pointing `m` at its own server
    (two containers; a rolling deploy that changes api_base while the old proxy still runs): each forgot
    the other's finished profile in turn and paid the whole test again, for ever, the spend reset
    each time so that the cap never stopped it. The second leaves the first's profile, pending
    with the reason, and onboards its own upstream once the first stops."""
    caplog.set_level(logging.INFO, logger="satroute.onboarding")
    old_config, new_config = two_proxies_configs(tmp_path)
    suite, questions = make_suite()
    old_upstream, new_upstream = Answering("The answer is (A)."), Answering("The answer is (B).")
    old_store, new_store = Store(tmp_path / "state"), Store(tmp_path / "state")
    old_registry, old = service(old_config, old_store, old_upstream, suite, questions)
    new_registry, new = service(new_config, new_store, new_upstream, suite, questions)
    seen = []
    new.metrics = type("M", (), {"observe_onboarding": lambda self, *a: seen.append(a)})()
    forgets = []
    real_forget = new_store.forget
    new_store.forget = lambda *a, **k: (forgets.append(a), real_forget(*a, **k))[1]
    old_watch = asyncio.create_task(old.watch(0.01))
    new_watch = None
    try:
        await wait_until(lambda: old_registry.snapshot.models["m"].profile is not None)
        new_watch = asyncio.create_task(new.watch(0.01))
        await wait_until(lambda: "m" in new._waiting)
        await asyncio.sleep(0.3)  # many ticks of both
        assert old_upstream.calls == len(questions) and new_upstream.calls == 0
        assert old_registry.snapshot.models["m"].profile is not None
        assert new_registry.snapshot.models["m"].profile is None  # not its upstream's
        assert {a.letter for a in old_store.answers("m")} == {"A"}
        assert old.status()["models"]["m"]["status"] == "done"
        entry = new.status()["models"]["m"]
        assert entry["status"] == "pending" and entry["questions_done"] == 0
        assert f"another proxy on this state directory ({old_store.owner}) points m at another " \
               "upstream" in entry["reason"]
        assert seen[-1] == ("m", 0, 0, "pending")
        waits = [r.getMessage() for r in caplog.records if "another proxy" in r.getMessage()]
        assert len(waits) == 1 and "trying again later" in waits[0]  # said once, not every tick
        assert "forgotten" not in caplog.text
        # waiting reads the other proxy's record; it took a write lock once, not on every tick
        assert len(forgets) == 1
    finally:
        old_watch.cancel()
        await old.stop()
        old_store.close()  # the old proxy stops: the new one onboards its own upstream
    try:
        await wait_until(lambda: new_registry.snapshot.models["m"].profile is not None)
        assert new_upstream.calls == len(questions)
        assert {a.letter for a in new_store.answers("m")} == {"B"}
        assert new.status()["models"]["m"]["status"] == "done"
    finally:
        if new_watch is not None:
            new_watch.cancel()
        await new.stop()
        new_store.close()


async def test_a_proxy_routing_a_model_it_does_not_onboard_on_its_stored_profile_keeps_it(tmp_path):
    """`onboard: false` routes on a profile onboarding stored for the same upstream: such a proxy
    recorded nothing of the upstream it points the model at, and another proxy pointing the model
    elsewhere forgot that profile while the first still routed on it."""
    old_config, new_config = two_proxies_configs(tmp_path)
    suite, questions = make_suite()
    new_upstream = Answering("The answer is (B).")
    with Store(tmp_path / "state") as old_store, Store(tmp_path / "state") as new_store:
        old_registry, old = service(old_config, old_store, Answering("The answer is (A)."), suite,
                                    questions)
        await old.sync()
        await asyncio.wait_for(old.runs["m"], 10)
        stop_onboarding(old_config, old_registry, tmp_path)  # routed on what is stored, as it is
        await old._announce()
        assert old_registry.snapshot.models["m"].profile is not None
        new_registry, new = service(new_config, new_store, new_upstream, suite, questions)
        for _ in range(5):
            await new.sync()
        assert new_upstream.calls == 0 and "m" in new._elsewhere
        old_registry.refresh_profiles()
        assert old_registry.snapshot.models["m"].profile is not None


@pytest.mark.parametrize("then_not_onboarded", [True, False])
async def test_a_proxy_listing_a_model_it_neither_onboards_nor_routes_keeps_nothing_from_others(
        tmp_path, then_not_onboarded):
    """No profile stored for its upstream (that run failed), then `onboard: false`, or as it was (a
    failed run waits for an edit, a restart or SIGHUP): the proxy routes on nothing, and must not
    keep another proxy from onboarding the model on its own upstream."""
    class Down(Answering):
        async def complete(self, call):
            self.calls += 1
            raise RuntimeError("upstream down")

    old_config, new_config = two_proxies_configs(tmp_path)
    suite, questions = make_suite()
    new_upstream = Answering("The answer is (B).")
    with Store(tmp_path / "state") as old_store, Store(tmp_path / "state") as new_store:
        old_registry, old = service(old_config, old_store, Down("x"), suite, questions)
        await old.sync()
        await asyncio.wait_for(old.runs["m"], 10)
        assert old_store.progress("m").status == "failed"
        if then_not_onboarded:
            stop_onboarding(old_config, old_registry, tmp_path)
        await old._announce()
        new_registry, new = service(new_config, new_store, new_upstream, suite, questions)
        await new.sync()
        await asyncio.wait_for(new.runs["m"], 10)
        assert new_upstream.calls == len(questions) and "m" not in new._elsewhere


async def test_an_upstream_changed_mid_run_starts_over(tmp_path):
    config = tmp_path / "providers.yaml"
    write_providers(config, pointing_at("openai/tiny", tmp_path))
    suite, questions = make_suite(n_tasks=5, per_task=10)
    dispatcher = ByUpstream(delay=0.01)
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, dispatcher, suite, questions)
        await svc.sync()
        await wait_until(lambda: len(store.answered("m")) >= 6)
        first = svc.runs["m"]
        write_providers(config, pointing_at("openai/big", tmp_path))
        registry.reload()
        await svc.sync()
        await asyncio.wait_for(svc.runs["m"], 20)
        assert first.cancelled()
        progress = store.progress("m")
        assert progress.status == "done" and progress.done == 50
        assert {a.letter for a in store.answers("m")} == {"B"}  # no answer of the old upstream


@pytest.mark.parametrize("edit", ["onboard_false", "profile_given", "elsewhere_and_onboard_false"])
async def test_an_edit_that_takes_a_running_model_out_of_onboarding_stops_its_run(tmp_path, edit):
    """`onboard: false` or a capability_profile added while the test runs: no more questions are
    paid for, and the store says why the run stopped instead of "running"."""
    config = tmp_path / "providers.yaml"
    entry = model_entry("m", "http://127.0.0.1:9", tmp_path)
    write_providers(config, [entry])
    suite, questions = make_suite(n_tasks=5, per_task=20)
    dispatcher = Answering("The answer is (A).", delay=0.01)
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, dispatcher, suite, questions)
        await svc.sync()
        await wait_until(lambda: len(store.answered("m")) >= 6)
        first = svc.runs["m"]
        if edit == "profile_given":
            entry = model_entry("m", "http://127.0.0.1:9", tmp_path, profile=True)
        else:
            entry["model_info"]["onboard"] = False
            if edit == "elsewhere_and_onboard_false":  # another upstream in the same edit
                entry["litellm_params"]["api_base"] = "http://127.0.0.2:9"
        write_providers(config, [entry])
        registry.reload()
        await svc.sync()
        await asyncio.gather(first, return_exceptions=True)
        asked = dispatcher.calls
        await asyncio.sleep(0.2)
        assert dispatcher.calls == asked < 100 and svc.runs["m"] is first and first.cancelled()
        progress = store.progress("m")
        reason = ("providers.yaml gives its capability_profile" if edit == "profile_given"
                  else "model_info.onboard is false")
        assert progress.status == "pending" and progress.reason == f"stopped: {reason}"
        shown = svc.status()["models"]["m"]
        assert shown["status"] == ("done" if edit == "profile_given" else "pending")
        assert (registry.snapshot.models["m"].profile is None) == (edit != "profile_given")


async def test_prices_changed_mid_run_count_the_rest_of_the_run(tmp_path):
    """A model first priced free, then at its real price: the run goes on at the new prices, so
    the spend cap stops it, instead of finishing the test on the old prices' estimate."""
    config = tmp_path / "providers.yaml"
    entry = model_entry("m", "http://127.0.0.1:9", tmp_path)
    entry["model_info"].update(input_price_per_mtok=0.0, output_price_per_mtok=0.0)
    write_providers(config, [entry])
    suite, questions = make_suite(n_tasks=5, per_task=20)

    class Held(Answering):  # answers 8 questions, then waits for the new prices: on a busy
        go = asyncio.Event()  # machine the free run could finish before the edit was read

        async def complete(self, call):
            if self.calls >= 8:
                await self.go.wait()
            return await super().complete(call)

    dispatcher = Held("The answer is (A).", delay=0.01)
    with Store(tmp_path / "state") as store:
        registry = ProviderRegistry(config, dict, store)
        svc = OnboardingService(store, registry, DispatchAsker(registry, dispatcher), spawn)
        svc._engine = Onboarding(store, suite, questions, svc.asker,
                                 Options(concurrency=2, spend_cap_usd=0.01))
        await svc.sync()
        await wait_until(lambda: len(store.answered("m")) >= 6)
        entry["model_info"].update(input_price_per_mtok=5000.0, output_price_per_mtok=5000.0)
        write_providers(config, [entry])
        registry.reload()
        await svc.sync()
        dispatcher.go.set()
        await asyncio.wait_for(svc.runs["m"], 10)
        progress = store.progress("m")
        assert progress.status == "failed" and "exceeds the spend cap $0.01" in progress.reason
        assert progress.done < 100 and registry.snapshot.models["m"].profile is None


async def test_a_price_edit_mid_run_keeps_the_asks_in_flight(tmp_path):
    """The run was cancelled and started again at the new prices: the questions in flight, paid
    for, were asked again. It now reads the new prices and goes on."""
    config = tmp_path / "providers.yaml"
    entry = model_entry("m", "http://127.0.0.1:9", tmp_path)
    entry["model_info"].update(input_price_per_mtok=0.0, output_price_per_mtok=0.0)  # free at first
    write_providers(config, [entry])
    suite, questions = make_suite(n_tasks=5, per_task=8)
    dispatcher = Answering("The answer is (A).", delay=0.02)
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, dispatcher, suite, questions, concurrency=4)
        await svc.sync()
        run = svc.runs["m"]
        await wait_until(lambda: len(store.answered("m")) >= 8)
        entry["model_info"].update(input_price_per_mtok=1.0, output_price_per_mtok=2.0)
        write_providers(config, [entry])
        registry.reload()
        await svc.sync()
        assert svc.runs["m"] is run  # the same run goes on
        await asyncio.wait_for(run, 10)
        progress = store.progress("m")
    assert progress.status == "done" and progress.done == 40
    assert dispatcher.calls == 40  # no question asked twice
    assert progress.spent > 0.0  # the answers after the edit, at the new prices


async def test_a_store_without_upstream_fingerprints_keeps_its_profile(tmp_path):
    """A profile stored by an earlier version (no fingerprint) is kept, and the fingerprint of
    the upstream configured now is recorded."""
    config = tmp_path / "providers.yaml"
    write_providers(config, pointing_at("openai/tiny", tmp_path))
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        store.finish("m", "tiny", {t: 0.5 for t in suite.task_ids})  # no fingerprint stored
        dispatcher = ByUpstream()
        registry, svc = service(config, store, dispatcher, suite, questions)
        await svc.sync()
        assert "m" not in svc.runs and registry.snapshot.models["m"].profile is not None
        write_providers(config, pointing_at("openai/big", tmp_path))
        registry.reload()
        await svc.sync()  # the fingerprint recorded above differs now
        await asyncio.wait_for(svc.runs["m"], 10)
        assert dispatcher.calls == {"openai/big": 12}


async def test_a_store_with_fingerprints_of_the_earlier_form_keeps_its_profiles(tmp_path):
    """Upgrading: the store holds fingerprints an earlier version hashed from litellm_params.model
    and api_base as written. Nothing is onboarded again, the models are routed with their profiles
    (an opted-out one too, which onboarding never checks), the fingerprint is kept as it is (an
    earlier version sharing the store reads it) with today's form recorded beside it, and an edit
    that writes the same upstream another way changes nothing."""
    def earlier_form(entry: dict) -> str:
        params = entry["litellm_params"]
        return hashlib.sha256(f"{params['model']}\n{params['api_base']}".encode()).hexdigest()[:16]

    config = tmp_path / "providers.yaml"
    entries = [model_entry(name, "http://user:pw1@Upstream.example:9/v1/", tmp_path)
               for name in ("m", "off")]
    entries[0]["litellm_params"]["model"] = "tiny"  # no provider: openai
    entries[1]["model_info"]["onboard"] = False
    write_providers(config, entries)
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        for entry in entries:
            name = entry["model_name"]
            store.begin(name, suite.name, len(questions), upstream=earlier_form(entry))
            store.finish(name, suite.name, {t: 0.5 for t in suite.task_ids})
        store._db.execute("UPDATE onboarding SET upstream_plain = NULL")  # an earlier version's rows
        dispatcher = ByUpstream()
        registry, svc = service(config, store, dispatcher, suite, questions)
        await svc.sync()
        assert not svc.runs and dispatcher.calls == {}
        assert registry.snapshot.models["m"].routable and registry.snapshot.models["off"].routable
        stored, plain = store._read("SELECT upstream, upstream_plain FROM onboarding WHERE model = 'm'")[0]
        assert stored == earlier_form(entries[0]) != plain == upstream_fingerprint(registry.snapshot.models["m"])
        entries[0]["litellm_params"].update(model="openai/tiny", api_base="http://user:pw2@upstream.example:9/v1")
        write_providers(config, entries)
        assert registry.reload()
        await svc.sync()
        assert not svc.runs and dispatcher.calls == {}
        assert registry.snapshot.models["m"].profile == {t: 0.5 for t in suite.task_ids}


async def test_a_run_resumed_from_an_earlier_version_keeps_its_fingerprint(tmp_path):
    """Upgrading midway through a model's test (a rolling upgrade: an earlier version beside this
    one on the same state directory): the run resumes without asking a stored question again, and
    leaves the fingerprint in the earlier version's form, so that version, which compares it with
    its own (litellm_params.model and api_base as written), still finds the same upstream and does
    not forget the model and onboard it again."""
    config = tmp_path / "providers.yaml"
    entry = model_entry("m", "http://user:pw@Upstream.example:9/v1/", tmp_path)
    entry["litellm_params"]["model"] = "tiny"  # no provider: openai
    write_providers(config, [entry])
    params = entry["litellm_params"]
    earlier = hashlib.sha256(f"{params['model']}\n{params['api_base']}".encode()).hexdigest()[:16]
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        store.begin("m", suite.name, len(questions), upstream=earlier)
        for q in questions[:5]:
            store.record("m", GradedAnswer(q.id, q.answer, True, f"The answer is ({q.answer})."))
        store._db.execute("UPDATE onboarding SET upstream_plain = NULL, status = 'pending'")
        dispatcher = ByUpstream()
        registry, svc = service(config, store, dispatcher, suite, questions)
        await svc.sync()
        await asyncio.wait_for(svc.runs["m"], 10)
        assert store.progress("m").status == "done"
        assert sum(dispatcher.calls.values()) == len(questions) - 5  # nothing asked twice
        stored = store._read("SELECT upstream FROM onboarding WHERE model = 'm'")[0][0]
        assert stored == earlier  # what the earlier version compares with its own form
        assert registry.snapshot.models["m"].routable


def _changed_for_the_version_before(store: Store, model: str, params: dict) -> bool:
    """``Store.upstream_changed`` as the version before the provider's own api_base written out
    and left out were one upstream decides it, for a file with ``params`` as litellm_params: the
    ``upstream`` column against the fingerprint of litellm_params.model and api_base as written,
    ``upstream_plain`` against that of the provider/model and api_base normalised (its
    ``upstream_fingerprint``: no credentials, lowercase scheme and host, no trailing /)."""
    def fp(model: str, base: str) -> str:
        return hashlib.sha256(f"{model}\n{base}".encode()).hexdigest()[:16]

    base = params.get("api_base") or ""
    url = urlsplit(base)
    plain = urlunsplit((url.scheme.lower(), url.netloc.rpartition("@")[2].lower(), url.path.rstrip("/"),
                        url.query, url.fragment))
    stored, stored_plain = store._read("SELECT upstream, upstream_plain FROM onboarding WHERE model = ?",
                                       (model,))[0]
    ours = fp(params["model"] if "/" in params["model"] else f"openai/{params['model']}", plain)
    return stored not in (None, ours, fp(params["model"], base)) and stored_plain != ours


async def test_a_profile_measured_on_openai_s_own_base_is_found_on_a_rollback(tmp_path):
    """A model onboarded with OpenAI's api_base written out one way (a trailing /) and rolled back
    to the version before, whose file writes it another way (no /, capitals): that version took
    both for one upstream, and must find the profile, not forget it and pay for the whole test
    again. Its check reads ``upstream_plain`` in its own form, which onboarding records."""
    config = tmp_path / "providers.yaml"
    entry = model_entry("m", "https://api.openai.com/v1/", tmp_path)
    write_providers(config, [entry])
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, Answering("The answer is (A)."), suite, questions)
        await svc.sync()
        await asyncio.wait_for(svc.runs["m"], 10)
        assert store.progress("m").status == "done"
        for written in ("https://api.openai.com/v1", "HTTPS://API.OpenAI.com/v1/", "https://api.openai.com/v1/"):
            assert not _changed_for_the_version_before(store, "m", dict(entry["litellm_params"], api_base=written))
        # the same upstream left out is another one to that version (as it always was); another host too
        params = dict(entry["litellm_params"])
        assert _changed_for_the_version_before(store, "m", dict(params, api_base="https://eu.example/v1"))


async def test_a_row_recorded_in_today_s_form_is_put_in_the_form_the_version_before_reads(tmp_path):
    """The version that made the provider's own api_base written out and left out one upstream
    recorded ``upstream_plain`` in that common form, which the version before takes for the base
    left out: a rollback with the file writing the base out forgot the profile. A process that
    finds such a row for a file writing the base out records the form that version reads; the
    profile is kept and nothing is asked."""
    config = tmp_path / "providers.yaml"
    entry = model_entry("m", "https://api.openai.com/v1/", tmp_path)
    rolled_back = dict(entry["litellm_params"], api_base="https://api.openai.com/v1")
    write_providers(config, [entry])
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        d = ProviderRegistry(config, dict, store).snapshot.models["m"]
        store.begin("m", suite.name, len(questions), upstream=upstream_fingerprint(d),
                    legacy=legacy_fingerprint(d))  # as the version that recorded today's form did
        store.finish("m", suite.name, {t: 0.5 for t in suite.task_ids})
        assert _changed_for_the_version_before(store, "m", rolled_back)
        dispatcher = ByUpstream()
        registry, svc = service(config, store, dispatcher, suite, questions)
        await svc.sync()
        assert not svc.runs and registry.snapshot.models["m"].routable
        assert not _changed_for_the_version_before(store, "m", rolled_back)
        await svc.sync()  # and today's version still finds it its own
        assert not svc.runs and registry.snapshot.models["m"].profile == {t: 0.5 for t in suite.task_ids}
        assert dispatcher.calls == {}


async def test_answers_an_earlier_grader_got_wrong_are_graded_again_once(tmp_path, caplog):
    """An earlier version graded a model's answers wrong (it compared the gold letters of a
    question folder of one's own as written, "c"): its profile said 0.0, and it was done. The
    service grades each model's stored answers again from their text when it first reads them,
    once per process (not every tick): the grades and the profile are rewritten, routed with, and
    logged once. A model another process holds (it may be onboarding it) is left alone until it
    lets go."""
    caplog.set_level(logging.INFO, logger="satroute.onboarding")
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry(name, "http://127.0.0.1:9", tmp_path) for name in ("m", "held")])
    suite, questions = make_suite()
    right = {t: 1.0 for t in suite.task_ids}
    with Store(tmp_path / "state") as store, Store(tmp_path / "state") as other:
        for name in ("m", "held"):
            for q in questions:  # every answer right, graded wrong
                store.record(name, GradedAnswer(q.id, q.answer, False, f"The answer is ({q.answer})."))
            store.finish(name, suite.name, {t: 0.0 for t in suite.task_ids})
        other.claim("held")
        registry, svc = service(config, store, Answering("x"), suite, questions)
        watch = asyncio.create_task(svc.watch(0.01))
        try:
            await wait_until(lambda: registry.snapshot.models["m"].profile == right)
            assert store.progress("m").correct == len(questions) and not svc.runs
            assert store.progress("held").correct == 0 and store.get("held") == {t: 0.0 for t in right}
            store._db.execute("UPDATE answers SET correct = 0 WHERE model = 'm'")
            other.release("held")
            await wait_until(lambda: registry.snapshot.models["held"].profile == right)
            await asyncio.sleep(0.1)  # more ticks
            assert store.progress("m").correct == 0  # graded again once, not on every tick
        finally:
            watch.cancel()
    logged = [r.getMessage() for r in caplog.records if "graded otherwise" in r.getMessage()]
    assert logged == [f"onboarding {name}: 12 of its 12 stored answers are graded otherwise by this "
                      "version's grader (12 now right, 0 now wrong); their grades and its profile "
                      "are rewritten" for name in ("m", "held")]


async def test_a_model_opted_out_says_so_and_forget_is_one_transaction(tmp_path):
    config = tmp_path / "providers.yaml"
    entry = model_entry("m", "http://127.0.0.1:9", tmp_path)
    entry["model_info"]["onboard"] = False
    write_providers(config, [entry])
    with Store(tmp_path / "state") as store:
        registry = ProviderRegistry(config, dict, store)
        svc = OnboardingService(store, registry, DispatchAsker(registry, Answering("x")), spawn)
        await svc.sync()
        assert "m" not in svc.runs
        status = svc.status()["models"]["m"]
        assert status["status"] == "pending" and "onboard is false" in status["reason"]
        store.begin("m", "tiny", 2)
        store.record("m", GradedAnswer("q1", "A", True, "The answer is (A)."))
        store._db.execute("CREATE TRIGGER refuse BEFORE DELETE ON onboarding BEGIN "
                          "SELECT RAISE(ABORT, 'disk gone'); END")
        with pytest.raises(sqlite3.DatabaseError):
            store.forget("m")
        assert store.answered("m") == {"q1"}  # the answers were not deleted without the rest


async def test_status_counts_only_the_suite_s_questions(tmp_path):
    """Answers stored for questions outside the suite (another suite's, kept) are not shown as
    progress on this one, in the admin status nor in the metrics."""
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, Answering("x"), suite, questions)
        store.begin("m", suite.name, len(questions))
        store.set_status("m", "stalled", "upstream down", suite=suite.name)
        store.record("m", GradedAnswer(questions[0].id, questions[0].answer, True))
        for i in range(5):
            store.record("m", GradedAnswer(f"other-suite/{i}", "A", False))
        entry = svc.status()["models"]["m"]
        assert (entry["questions_done"], entry["questions_total"], entry["accuracy_so_far"]) == (1, 12, 1.0)
        seen = []
        svc.metrics = type("M", (), {"observe_onboarding": lambda self, *a: seen.append(a)})()
        svc._report(store.all_progress(svc._suite_questions()))
        assert seen == [("m", 1, 12, "stalled")]


async def test_a_model_another_process_onboards_is_left_to_it_and_its_profile_picked_up(tmp_path):
    """`satroute onboard` holds the model: the proxy's service asks nothing and records no
    failure, tries again on later ticks, and routes with the profile the other process stored
    (no metrics configured, no edit of providers.yaml)."""
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite()
    dispatcher = Answering("The answer is (A).")
    with Store(tmp_path / "state") as store, Store(tmp_path / "state") as cli:
        cli.claim("m", suite.name)
        cli.begin("m", suite.name, len(questions))
        registry, svc = service(config, store, dispatcher, suite, questions)
        watch = asyncio.create_task(svc.watch(0.01))
        try:
            await wait_until(lambda: "m" in svc._waiting)
            await asyncio.sleep(0.1)  # several ticks: tried again, still busy
            assert dispatcher.calls == 0 and store.progress("m").status == "running"
            assert "being onboarded by" in svc._waiting["m"] and "m" not in svc._failed_stamp
            for q in questions:  # the other process finishes the test
                cli.record("m", GradedAnswer(q.id, "A", q.answer == "A"))
            cli.finish("m", suite.name, {t: 0.25 for t in suite.task_ids})
            cli.release("m")
            await wait_until(lambda: registry.snapshot.models["m"].profile is not None)
            await asyncio.sleep(0.05)
            assert dispatcher.calls == 0 and not svc._waiting
            assert registry.snapshot.models["m"].profile == {t: 0.25 for t in suite.task_ids}
        finally:
            watch.cancel()
            await svc.stop()


async def test_a_profile_another_process_stored_is_routed_with_without_a_restart(tmp_path):
    """`satroute onboard` onboards a model the proxy does not onboard itself (`onboard: false`)
    while the proxy runs: the next tick of the watch loop picks the profile up (no metrics
    configured, no edit of providers.yaml)."""
    config = tmp_path / "providers.yaml"
    entry = model_entry("m", "http://127.0.0.1:9", tmp_path)
    entry["model_info"]["onboard"] = False
    write_providers(config, [entry])
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, Answering("x"), suite, questions)
        watch = asyncio.create_task(svc.watch(0.01))
        try:
            await asyncio.sleep(0.05)
            assert registry.snapshot.models["m"].profile is None
            with Store(tmp_path / "state") as cli:
                cli.begin("m", suite.name, len(questions))
                cli.finish("m", suite.name, {t: 0.75 for t in suite.task_ids})
            await wait_until(lambda: registry.snapshot.models["m"].profile is not None, 2)
            assert registry.snapshot.models["m"].profile == {t: 0.75 for t in suite.task_ids}
            assert "m" not in svc.runs
        finally:
            watch.cancel()


@pytest.mark.parametrize("how", ["measured_again", "forgotten"])
async def test_a_profile_another_process_replaced_or_forgot_is_not_routed_with(tmp_path, how):
    """`satroute onboard --restart` beside a proxy that routes with the model's stored profile.
    Measured again: the next ticks route with the new profile (no restart, no edit). Stopped
    midway, the store holding no profile and part of a new test: the proxy stops routing with the
    forgotten profile and, once the other process let go of the model, resumes that test."""
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store, Store(tmp_path / "state") as cli:
        cli.finish("m", suite.name, {t: 0.25 for t in suite.task_ids})
        dispatcher = Answering("The answer is (A).")
        registry, svc = service(config, store, dispatcher, suite, questions)
        watch = asyncio.create_task(svc.watch(0.01))
        try:
            await asyncio.sleep(0.05)
            assert registry.snapshot.models["m"].profile == {t: 0.25 for t in suite.task_ids}
            cli.claim("m", suite.name)
            cli.forget("m")
            cli.begin("m", suite.name, len(questions))
            if how == "measured_again":
                cli.finish("m", suite.name, {t: 0.75 for t in suite.task_ids}, leased=True)
                await wait_until(lambda: registry.snapshot.models["m"].profile
                                 == {t: 0.75 for t in suite.task_ids}, 2)
                assert svc.profile("m")["tasks"] == {t: 0.75 for t in suite.task_ids}
                assert dispatcher.calls == 0
                return
            for q in questions[:3]:
                cli.record("m", GradedAnswer(q.id, "B", q.answer == "B"), leased=True)
            await wait_until(lambda: registry.snapshot.models["m"].profile is None, 2)
            assert svc.profile("m") is None and dispatcher.calls == 0  # the other process holds it
            cli.interrupted("m")
            cli.release("m")
            await wait_until(lambda: registry.snapshot.models["m"].profile is not None)
            assert dispatcher.calls == len(questions) - 3  # resumed, not started over
            assert store.progress("m").status == "done"
        finally:
            watch.cancel()
            await svc.stop()


async def test_a_model_freed_by_another_process_is_resumed_by_the_service(tmp_path):
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite()
    dispatcher = Answering("The answer is (A).")
    with Store(tmp_path / "state") as store:
        with Store(tmp_path / "state") as cli:
            cli.begin("m", suite.name, len(questions))
            cli.record("m", GradedAnswer(questions[0].id, "A", True))
            registry, svc = service(config, store, dispatcher, suite, questions)
            watch = asyncio.create_task(svc.watch(0.01))
            await wait_until(lambda: "m" in svc._waiting)
        try:  # the other process stopped (its lease is released): the service takes over
            await wait_until(lambda: registry.snapshot.models["m"].profile is not None)
            assert dispatcher.calls == len(questions) - 1
        finally:
            watch.cancel()
            await svc.stop()


async def test_store_writes_never_block_the_event_loop(tmp_path):
    """Another process holds the database's write lock: the onboarding's writes wait for it on
    worker threads while the event loop (which serves the proxy's requests) goes on."""
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite(n_tasks=4, per_task=10)
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, Answering("The answer is (A).", delay=0.005),
                                suite, questions)
        watch = asyncio.create_task(svc.watch(0.01))
        await wait_until(lambda: len(store.answered("m")) >= 3)
        other = sqlite3.connect(tmp_path / "state" / "satroute.db", isolation_level=None,
                                check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.5, other.execute, ("COMMIT",)).start()  # held for 0.5 s
        gaps, last = [], asyncio.get_running_loop().time()
        for _ in range(40):  # 0.4 s of ticks while the lock is held
            await asyncio.sleep(0.01)
            now = asyncio.get_running_loop().time()
            gaps.append(now - last)
            last = now
        held = len(store.answered("m"))
        await asyncio.wait_for(svc.runs["m"], 10)
        watch.cancel()
        other.close()
        assert max(gaps) < 0.2, max(gaps)
        assert held < 40 and store.progress("m").status == "done"


async def test_removed_models_leave_the_onboarding_metrics(tmp_path):
    from proxy.metrics import Metrics

    config = tmp_path / "providers.yaml"
    both = [model_entry("m", "http://127.0.0.1:9", tmp_path),
            model_entry("other", "http://127.0.0.1:9", tmp_path)]
    write_providers(config, both)
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, Answering("x"), suite, questions)
        svc.metrics = metrics = Metrics()
        for name in ("m", "other"):
            store.begin(name, suite.name, len(questions))
        svc._report(store.all_progress(svc._suite_questions()))
        assert 'satroute_onboarding_state{model="m",state="running"} 1.0' in metrics.render().decode()
        write_providers(config, both[1:])
        registry.reload()
        svc._report(store.all_progress(svc._suite_questions()))
        text = metrics.render().decode()
        assert 'model="m"' not in text
        assert 'satroute_onboarding_state{model="other",state="running"} 1.0' in text


async def test_the_watch_loop_outlives_a_store_locked_past_its_busy_timeout(tmp_path, monkeypatch):
    """Another process holds the write lock longer than the busy timeout just when a model's
    stored answers must be forgotten (its upstream changed): the model waits, the loop goes on,
    and the run starts once the lock is free."""
    import proxy.store

    monkeypatch.setattr(proxy.store, "BUSY_TIMEOUT_S", 0.2)
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        store.claim("m")
        store.begin("m", suite.name, total=len(questions), upstream="an-older-upstream")
        store.record("m", GradedAnswer(questions[0].id, "A", True))
        store.release("m")
        registry, svc = service(config, store, Answering("The answer is (A)."), suite, questions)
        other = sqlite3.connect(tmp_path / "state" / "satroute.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writing, for longer than the timeout
        watch = asyncio.create_task(svc.watch(0.05))
        try:
            await asyncio.sleep(0.8)
            assert not watch.done() and "m" not in svc.runs and "m" in svc._waiting
            other.execute("COMMIT")
            await wait_until(lambda: "m" in svc.runs)
            await asyncio.wait_for(svc.runs["m"], 10)
            assert store.progress("m").status == "done" and not watch.done()
        finally:
            other.close()
            watch.cancel()


async def test_a_model_shown_done_is_already_an_auto_candidate(tmp_path):
    """The profile is stored (a run that just finished, here or in another process) before the
    registry reads it: the admin status must not say done while auto cannot pick the model yet."""
    from scorer.aptitude import profile_from_graded

    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, Answering("x"), suite, questions)
        store.begin("m", suite.name, total=len(questions))
        for q in questions:
            store.record("m", GradedAnswer(q.id, q.answer, True))
        store.finish("m", suite.name, profile_from_graded(suite, {q.id: True for q in questions}))
        assert registry.snapshot.models["m"].profile is None  # nobody told the registry yet
        entry = svc.status()["models"]["m"]
        assert entry["status"] == "done" and entry["profile_source"] == "onboarding"
        assert registry.snapshot.models["m"].routable


async def test_an_edit_that_fixes_a_failed_run_starts_a_new_one_though_it_settles_first(tmp_path):
    """The registry takes an edit once two reads agree; the onboarding service, which stamps a
    failure with the file's digest and waits for another, must not see the new digest while the
    snapshot is still the failing one's, or the fix would never start a run."""
    config = tmp_path / "providers.yaml"
    entry = model_entry("m", "http://127.0.0.1:9", tmp_path)
    entry["model_info"].update(input_price_per_mtok=5000.0, output_price_per_mtok=5000.0)
    write_providers(config, [entry])
    suite, questions = make_suite()
    with Store(tmp_path / "state") as store:
        registry = ProviderRegistry(config, dict, store)
        svc = OnboardingService(store, registry, DispatchAsker(registry, Answering("The answer is (A).")), spawn)
        svc._engine = Onboarding(store, suite, questions, svc.asker, Options(concurrency=2, spend_cap_usd=0.01))
        try:
            await svc.sync()
            await asyncio.wait_for(svc.runs["m"], 10)
            assert store.progress("m").status == "failed"  # over the spend cap
            entry["model_info"].update(input_price_per_mtok=0.0, output_price_per_mtok=0.0)  # the fix
            write_providers(config, [entry])
            before = registry.file_digest
            assert not registry.reload(settle=True)  # read once, held back to settle ...
            assert registry.file_digest == before  # ... so the digest is still the snapshot's
            await svc.sync()  # an onboarding tick meanwhile
            await asyncio.gather(*svc.runs.values())
            assert registry.reload(settle=True)  # taken
            await svc.sync()
            await asyncio.wait_for(svc.runs["m"], 10)
            assert store.progress("m").status == "done"
        finally:
            await svc.stop()


async def test_a_failed_run_is_tried_again_when_asked_with_the_file_unchanged(tmp_path, caplog):
    """An upstream down or refusing while a model was added failed its run; once it was back,
    nothing short of an edit or a restart tried again (SIGHUP asks for this), and the failure
    did not say how to."""
    import logging

    from proxy.errors import UpstreamClientError

    class RefusingThenAnswering(Answering):
        refusing = True

        async def complete(self, call):
            if self.refusing:
                self.calls += 1
                raise UpstreamClientError("invalid api key", status=401, model="m")
            return await super().complete(call)

    caplog.set_level(logging.INFO, logger="satroute.onboarding")
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite()
    upstream = RefusingThenAnswering("The answer is (A).")
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, upstream, suite, questions)
        try:
            await svc.sync()
            await asyncio.wait_for(svc.runs["m"], 10)
            assert store.progress("m").status == "failed"
            assert "tried again when its entry in providers.yaml changes, at the next start, or on SIGHUP" \
                in caplog.text
            upstream.refusing = False  # the key is fixed at the provider's end
            watching = asyncio.create_task(svc.watch(0.02))  # as the proxy runs it: the file unchanged
            await asyncio.sleep(0.2)
            assert svc.runs["m"].done() and store.progress("m").status == "failed"  # not by itself
            assert svc.retry_failed() == ["m"]
            assert svc.retry_failed() == []  # a second SIGHUP before the tick takes nothing back
            await wait_until(lambda: store.progress("m").status == "done", 10)
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        finally:
            await svc.stop()


class RefusingKey(Answering):
    """An upstream that refuses the key of every request: a run fails at its first question."""

    async def complete(self, call):
        from proxy.errors import UpstreamClientError

        self.calls += 1
        raise UpstreamClientError("invalid api key", status=401, model="m")


def _refused_everywhere(tmp_path, caplog):
    """providers.yaml with model ``m`` on an upstream refusing its key, the suite and questions,
    and that upstream; onboarding's log caught from INFO."""
    caplog.set_level(logging.INFO, logger="satroute.onboarding")
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite()
    return config, suite, questions, RefusingKey("x")


async def test_a_failure_stored_before_a_proxy_s_first_tick_is_its_own_too(tmp_path, caplog):
    """Two proxies started together: one failed the run before the other's first tick, which took
    the file for read anew and the failure for older than its reading: it ran the same run again,
    and paid for it (the test below failed one run in four on a busy machine)."""
    config, suite, questions, upstream = _refused_everywhere(tmp_path, caplog)
    with Store(tmp_path / "state") as a_store, Store(tmp_path / "state") as b_store:
        _, a = service(config, a_store, upstream, suite, questions)
        _, b = service(config, b_store, upstream, suite, questions)  # started: its file read now
        await a.sync()
        await wait_until(lambda: a_store.progress("m") is not None
                         and a_store.progress("m").status == "failed")
        await b.sync()  # its first tick, after the other's failure
        await asyncio.sleep(0.2)
    assert sum("questions to ask" in r.getMessage() for r in caplog.records) == 1
    assert "failed it with the same configuration" in caplog.text


async def test_a_run_another_proxy_failed_with_the_same_configuration_is_not_run_again(tmp_path, caplog):
    """Two proxies on one state directory with the same providers.yaml: a run one of them failed
    (the upstream refuses the key) was run again by the other, with the file unchanged and no
    restart, and paid for again. The other takes that failure for its own: it tries again on
    SIGHUP, and a proxy started afterwards (a restart) tries again too, once."""
    from proxy.onboarding_service import run_config

    def runs():
        return sum("questions to ask" in r.getMessage() for r in caplog.records)

    config, suite, questions, upstream = _refused_everywhere(tmp_path, caplog)
    with Store(tmp_path / "state") as a_store, Store(tmp_path / "state") as b_store:
        a_registry, a = service(config, a_store, upstream, suite, questions)
        b_registry, b = service(config, b_store, upstream, suite, questions)
        d = a_registry.snapshot.models["m"]
        mine = run_config(d, "mmlu_pro", a.options, a_registry.local_key)
        assert mine == run_config(b_registry.snapshot.models["m"], "mmlu_pro", b.options,
                                  b_registry.local_key)
        other_key = dataclasses.replace(d, api_key="another-key")
        assert run_config(other_key, "mmlu_pro", a.options, a_registry.local_key) != mine
        # keyed with the state directory's secret: the store alone cannot test guesses of the key
        assert run_config(d, "mmlu_pro", a.options, "") != mine
        watches = [asyncio.create_task(svc.watch(0.01)) for svc in (a, b)]
        try:
            await wait_until(lambda: a_store.progress("m") is not None
                             and a_store.progress("m").status == "failed")
            await asyncio.sleep(0.3)  # many ticks of both
            assert runs() == 1
            for svc in (a, b):
                entry = svc.status()["models"]["m"]
                assert entry["status"] == "failed" and "invalid api key" in entry["reason"]
            assert "failed it with the same configuration" in caplog.text
            assert b.retry_failed() == ["m"]  # SIGHUP, whether it ran it or took the other's failure
            await wait_until(lambda: runs() == 2)
            await asyncio.sleep(0.3)
            assert runs() == 2  # the other took this failure for its own too
            with Store(tmp_path / "state") as c_store:  # a proxy (re)started: it tries once
                c_registry, c = service(config, c_store, upstream, suite, questions)
                c_watch = asyncio.create_task(c.watch(0.01))
                try:
                    await wait_until(lambda: runs() == 3)
                    await asyncio.sleep(0.3)
                    assert runs() == 3
                finally:
                    c_watch.cancel()
                    await asyncio.gather(c_watch, return_exceptions=True)
                    await c.stop()
        finally:
            for watch in watches:
                watch.cancel()
            await asyncio.gather(*watches, return_exceptions=True)
            await a.stop()
            await b.stop()


async def test_a_failure_recorded_before_the_clock_went_back_is_tried_again(tmp_path, caplog, monkeypatch):
    """A failed run, then NTP steps the wall clock back an hour: the failure's time is now later
    than the proxy's reading of its file, and was taken for another process's failure since that
    reading, so neither SIGHUP nor a restart tried the run again for an hour."""
    def runs():
        return sum("questions to ask" in r.getMessage() for r in caplog.records)

    config, suite, questions, upstream = _refused_everywhere(tmp_path, caplog)
    with Store(tmp_path / "state") as store:
        _, svc = service(config, store, upstream, suite, questions)
        try:
            await svc.sync()
            await wait_until(lambda: store.progress("m") is not None and store.progress("m").status == "failed")
            wall = time.time
            monkeypatch.setattr(time, "time", lambda: wall() - 3600)
            assert svc.retry_failed() == ["m"]
            await svc.sync()
            await wait_until(lambda: runs() == 2)
        finally:
            await svc.stop()
    monkeypatch.setattr(time, "time", lambda: wall() - 7200)
    with Store(tmp_path / "state") as store:  # restarted: tried again, once
        _, svc = service(config, store, upstream, suite, questions)
        try:
            await svc.sync()
            await wait_until(lambda: runs() == 3)
        finally:
            await svc.stop()
    assert "failed it with the same configuration" not in caplog.text


async def test_a_model_litellm_cannot_call_is_pending_from_the_first_check_never_failed(tmp_path):
    """A provider litellm does not know ('opnai/'): at start-up the watch began its run before
    litellm was imported, so the dispatcher refused every ask: 'failed', and the model cooled,
    where the same model added later was 'pending', unavailable, with the reason. litellm is now
    imported before the first run starts."""
    from proxy.cooldown import Cooldowns
    from proxy.dispatch import RetryingDispatcher

    config = tmp_path / "providers.yaml"
    entry = model_entry("typo", "http://127.0.0.1:9", tmp_path)
    entry["litellm_params"]["model"] = "opnai/typo"
    entry["model_info"]["fast_path"] = False  # the litellm path, as a provider it does not know takes
    write_providers(config, [entry])
    suite, questions = make_suite()
    cooldowns = Cooldowns()
    dispatcher = RetryingDispatcher(cooldowns)
    with Store(tmp_path / "state") as store:
        registry = ProviderRegistry(config, dict, store)
        registry.checks.append(dispatcher.unusable)  # as the app wires them
        dispatcher.on_litellm.append(registry.refresh_profiles)
        svc = OnboardingService(store, registry, DispatchAsker(registry, dispatcher), spawn)
        svc._engine = Onboarding(store, suite, questions, svc.asker, Options(concurrency=2))
        watch = asyncio.create_task(svc.watch(0.05))
        try:
            await wait_until(lambda: registry.snapshot.models["typo"].unavailable is not None, 30)
            await asyncio.sleep(0.3)  # a few more checks
            shown = svc.status()["models"]["typo"]
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            await dispatcher.close()
        assert shown["status"] == "pending" and "litellm knows no provider 'opnai'" in shown["reason"]
        assert "typo" not in svc.runs and store.progress("typo") is None
        assert cooldowns.cooling_models() == []


async def test_a_litellm_that_cannot_be_loaded_stops_no_test(tmp_path, caplog):
    """The watch imports litellm before a run starts: an import that fails must not keep every
    model (those that never use litellm too) from its test, nor be tried again every tick."""
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite()

    class Broken(Answering):
        prepared = 0

        async def prepare(self, models):
            self.prepared += 1
            raise ImportError("No module named 'litellm.llms'")

    dispatcher = Broken("The answer is (A).")
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, dispatcher, suite, questions)
        watch = asyncio.create_task(svc.watch(0.02))
        try:
            await wait_until(lambda: "m" in svc.runs)
            await asyncio.wait_for(svc.runs["m"], 10)
            await asyncio.sleep(0.1)  # more ticks
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        assert store.progress("m").status == "done"
    assert dispatcher.prepared == 1 and "litellm cannot be loaded (ImportError" in caplog.text


async def test_what_is_kept_about_a_model_goes_when_it_leaves_the_file(tmp_path):
    """Every run stayed in ``runs`` for the life of the process, a cancelled one with its whole
    stack (some 180 KB): admins who add and remove models for weeks grew the proxy by one for
    every name ever onboarded."""
    import gc
    import weakref

    from proxy import onboarding_service

    config = tmp_path / "providers.yaml"
    other = model_entry("other", "http://127.0.0.1:9", tmp_path, profile=True)
    suite, questions = make_suite(n_tasks=5, per_task=20)

    class ThenHangs(Answering):  # four answers, then every ask hangs: the tick cancels the run
        async def complete(self, call):
            if self.calls >= 4:
                await asyncio.Event().wait()
            return await super().complete(call)

    dispatcher = ThenHangs("The answer is (A).", delay=0.01)
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path), other])
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, dispatcher, suite, questions, concurrency=2)
        watch = asyncio.create_task(svc.watch(0.05))
        try:
            await wait_until(lambda: len(store.answered("m")) >= 4 and svc._engine._live
                             and next(iter(svc._engine._live)).in_flight == 2)
            run = svc.runs["m"]
            state = weakref.ref(next(iter(svc._engine._live)))  # the run's state, held by its stack
            onboarding_service._FREE_SIDES.add(("m", "output"))
            write_providers(config, [other])
            registry.reload()  # the watch's next tick cancels the run; no edit comes after
            await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), 10)
            assert run.cancelled()
            del run
            await wait_until(lambda: "m" not in svc.runs)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        gc.collect()
        assert state() is None
        assert "m" not in svc._run_upstream and "m" not in svc._run_prices and "m" not in svc._picked_up
        assert ("m", "output") not in onboarding_service._FREE_SIDES


@pytest.mark.parametrize("middle", ["elsewhere", "removed"])
async def test_an_edit_undone_before_the_next_tick_neither_mixes_answers_nor_stops_the_run(tmp_path, middle):
    """Two reloads between ticks (SIGHUP twice, config tooling): re-pointed, the questions asked
    meanwhile went to the other upstream and its answers were stored as the model's own (16-21%
    of its profile); removed, the run stopped "pending" at its next ask and, the file being back
    as it was, nothing ever started it again."""
    config = tmp_path / "providers.yaml"
    write_providers(config, pointing_at("openai/tiny", tmp_path))
    original = config.read_bytes()
    suite, questions = make_suite(n_tasks=4, per_task=5)

    class SomeSlow(ByUpstream):  # one worker is mostly in a slow ask, the other asks quickly
        async def complete(self, call):
            self.delay = 0.8 if sum(self.calls.values()) % 4 == 3 else 0.01
            return await super().complete(call)

    dispatcher = SomeSlow()
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, dispatcher, suite, questions, concurrency=2)
        watch = asyncio.create_task(svc.watch(0.5))
        try:
            await wait_until(lambda: len(store.answered("m")) >= 4)
            if middle == "elsewhere":
                write_providers(config, pointing_at("openai/other", tmp_path))
            else:
                write_providers(config, [model_entry("unrelated", "http://127.0.0.1:9", tmp_path, profile=True)])
            registry.reload_now("SIGHUP")
            await asyncio.sleep(0.1)  # asks meet the edit; no tick comes in between
            config.write_bytes(original)
            registry.reload_now("SIGHUP")
            await wait_until(lambda: store.progress("m").status == "done", timeout=20)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            await svc.stop()
        assert {a.letter for a in store.answers("m")} == {"A"} and store.progress("m").done == len(questions)
        assert dispatcher.calls.get("openai/other", 0) == 0


async def test_a_run_the_store_refuses_to_record_shows_stalled_not_the_rows_running(tmp_path):
    """A full disk refused every write, the stalled status included: /admin/onboarding read the
    row, which still said running with no reason, through the whole outage."""
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite(n_tasks=4, per_task=5)
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, Answering("The answer is (A).", delay=0.01), suite, questions)
        record, set_status, full = store.record, store.set_status, [False]

        def refused(write):
            def call(*args, **kwargs):
                if full[0]:
                    raise sqlite3.OperationalError("database or disk is full")
                return write(*args, **kwargs)
            return call

        store.record, store.set_status = refused(record), refused(set_status)
        await svc.sync()
        await wait_until(lambda: len(store.answered("m")) >= 3)
        full[0] = True
        await wait_until(lambda: svc.status()["models"]["m"]["status"] == "stalled")
        shown = svc.status()["models"]["m"]
        assert shown["reason"] == "the state store refuses writes: database or disk is full"
        assert store.progress("m").status == "running"  # what the store still says
        full[0] = False
        await asyncio.wait_for(svc.runs["m"], 20)
        assert svc.status()["models"]["m"]["status"] == "done"


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_state_store_file_deleted_or_replaced_under_the_proxy_stops_onboarding(tmp_path, how, caplog):
    """SQLite went on writing to the file it had open: the status counted answers up to 88 that
    no restart would find, and they were asked and paid for again (190 asks for 100 answers)."""
    import shutil

    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite(n_tasks=5, per_task=20)
    dispatcher = Answering("The answer is (A).", delay=0.02)
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, dispatcher, suite, questions)
        watch = asyncio.create_task(svc.watch(0.05))
        try:
            await wait_until(lambda: len(store.answered("m")) >= 4)
            if how == "deleted":
                for suffix in ("", "-wal", "-shm"):
                    (tmp_path / "state" / f"satroute.db{suffix}").unlink(missing_ok=True)
            else:  # a backup restored over it
                shutil.copy(tmp_path / "state" / "satroute.db", tmp_path / "backup.db")
                (tmp_path / "backup.db").replace(tmp_path / "state" / "satroute.db")
            with caplog.at_level(logging.ERROR, logger="satroute.onboarding"):
                await wait_until(lambda: svc.store_lost is not None)
            await asyncio.wait_for(svc.runs["m"], 10)  # its asks out end; no new one goes
            asked = dispatcher.calls
            await asyncio.sleep(0.3)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        assert dispatcher.calls == asked < len(questions)
        assert f"satroute.db {'was deleted' if how == 'deleted' else 'was replaced by another file'}" in svc.store_lost
        assert svc.status()["stopped"] == svc.store_lost and svc.store_lost in caplog.text


async def test_a_passing_stat_failure_of_the_state_store_is_no_lost_store(tmp_path, monkeypatch):
    """One ESTALE of a network volume stopped onboarding until a restart, the file unchanged."""
    import errno
    import os

    from proxy import store as store_module

    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m", "http://127.0.0.1:9", tmp_path)])
    suite, questions = make_suite(n_tasks=4, per_task=5)
    with Store(tmp_path / "state") as store:
        registry, svc = service(config, store, Answering("The answer is (A).", delay=0.01), suite, questions)
        real, failures = os.stat, [3]

        def flaky(path, *args, **kwargs):
            if str(path).endswith("satroute.db") and failures[0]:
                failures[0] -= 1
                raise OSError(errno.ESTALE, "Stale file handle")
            return real(path, *args, **kwargs)

        monkeypatch.setattr(store_module.os, "stat", flaky)
        for _ in range(4):
            await svc._check_store_file()
        assert failures == [0] and svc.store_lost is None and not svc.draining
        assert svc.retry_failed() == []  # nothing failed
        svc._failed_stamp["x"] = b"d"
        svc.begin_drain()  # stopping (or stopped for a lost store): SIGHUP tries nothing again
        assert svc.retry_failed() == [] and "x" in svc._failed_stamp
        await svc.stop()
    for at_open in (1, 3):  # while a store opens: tried again; failing throughout, its file is
        failures[0] = at_open  # not known yet, which is not another file
        with Store(tmp_path / "state") as reopened:
            assert failures == [0] and reopened.file_changed() is None and reopened.file_changed() is None
            (tmp_path / "state" / "satroute.db").unlink()
            assert reopened.file_changed() == "was deleted"
    failures[0] = 3
    with Store(tmp_path / "state") as reopened:  # deleted before any stat could tell it: still told
        (tmp_path / "state" / "satroute.db").unlink()
        assert reopened.file_changed() == "was deleted"
