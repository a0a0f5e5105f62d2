"""Onboarding inside the running proxy (no shared data): a tiny suite, the mock upstream, admin API."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from proxy.app import create_app
from proxy.settings import Settings
from onboarding.fakes import model_entry, tiny_suite_files, wait_for, write_providers
from support.mock_upstream import MockUpstream, answer, fail
from support.proxy_server import ProxyServer

KEY = "mk-onboarding-test"


class Recorder:
    """A scorer that prefers the model named `fresh` and records the candidates it was shown."""

    def __init__(self):
        self.candidates: list[set[str]] = []
        self.lock = threading.Lock()

    def score(self, instruction, candidates):
        with self.lock:
            self.candidates.append(set(candidates))
        return {m: (1.0 if m == "fresh" else 0.5) for m in candidates}


@pytest.fixture
def up():
    with MockUpstream() as mock:
        yield mock


def test_models_without_profile_onboard_in_the_background(tmp_path, up):
    suite, data = tiny_suite_files(tmp_path)
    up.set("fresh", answer("Thinking... The answer is (A).", delay=0.3))  # right on task0 only
    up.set("refused", fail(404, "no such model"))
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("m1", up.url, tmp_path, profile=True), model_entry("fresh", up.url, tmp_path)])
    (tmp_path / "m1.json").write_text('{"suite": "tiny", "tasks": {"task0": 0.5, "task1": 0.5}}')
    scorer = Recorder()
    settings = Settings(config=config, scorer="constant", master_key=KEY, reload_interval_s=0.1,
                        onboarding=True, state_dir=tmp_path / "state", onboarding_data=data,
                        onboarding_suite=str(suite))
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    with ProxyServer(create_app(settings, scorer=scorer)) as proxy, httpx.Client(
            base_url=proxy.base, headers=auth, timeout=10) as client:
        status = lambda: client.get("/admin/onboarding").json()["models"]  # noqa: E731
        running = wait_for(status, lambda s: s["fresh"]["status"] == "running")
        assert running["m1"]["profile_source"] == "providers.yaml"
        # while it takes the test: callable by name, but not an `auto` candidate
        assert client.post("/v1/chat/completions", json=chat).headers["x-satroute-model"] == "m1"
        assert scorer.candidates[-1] == {"m1"}
        assert client.get("/admin/models/fresh/profile").status_code == 404
        assert client.get("/admin/models/m1/profile").json() == {
            "model": "m1", "suite": "tiny", "source": "providers.yaml", "tasks": {"task0": 0.5, "task1": 0.5}}
        done = wait_for(status, lambda s: s["fresh"]["status"] == "done")["fresh"]
        assert (done["questions_done"], done["questions_total"]) == (6, 6)
        assert done["accuracy_so_far"] == 0.5 and done["profile_source"] == "onboarding"
        profile = client.get("/admin/models/fresh/profile").json()
        assert profile == {"model": "fresh", "suite": "tiny", "source": "onboarding",
                           "tasks": {"task0": 1.0, "task1": 0.0}}
        reply = client.post("/v1/chat/completions", json=chat)
        assert reply.headers["x-satroute-model"] == "fresh"
        assert scorer.candidates[-1] == {"m1", "fresh"}
        asked = [b for b in up.bodies("fresh") if "Question number" in b["messages"][-1]["content"]]
        assert len(asked) == 6 and asked[0]["temperature"] == 0.0
        # the admin API is behind the master key
        assert httpx.get(f"{proxy.base}/admin/onboarding").status_code == 401
        assert httpx.get(f"{proxy.base}/admin/models/fresh/profile").status_code == 401
        # a reload adds a model that cannot be onboarded: failed with the reason, the rest serves
        write_providers(config, [model_entry("m1", up.url, tmp_path, profile=True),
                        model_entry("fresh", up.url, tmp_path), model_entry("refused", up.url, tmp_path)])
        failed = wait_for(status, lambda s: s.get("refused", {}).get("status") == "failed")
        assert "no such model" in failed["refused"]["reason"]
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
    # a restart serves the stored profile at once and asks nothing again
    before = len(up.bodies("fresh"))
    with ProxyServer(create_app(settings, scorer=scorer)) as proxy, httpx.Client(
            base_url=proxy.base, headers=auth, timeout=10) as client:
        assert client.get("/admin/models/fresh/profile").json()["tasks"] == {"task0": 1.0,
                                                                              "task1": 0.0}
        time.sleep(0.3)
        assert client.get("/admin/onboarding").json()["models"]["fresh"]["status"] == "done"
    assert len(up.bodies("fresh")) == before


def test_an_upstream_down_mid_test_stalls_then_resumes(tmp_path, up):
    suite, data = tiny_suite_files(tmp_path, n_tasks=2, per_task=6)
    up.set("fresh", answer("The answer is (B).", delay=0.05))
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("fresh", up.url, tmp_path)])
    settings = Settings(config=config, scorer="constant", reload_interval_s=0.1, onboarding=True,
                        state_dir=tmp_path / "state", onboarding_data=data,
                        onboarding_suite=str(suite), onboarding_concurrency=1)
    with ProxyServer(create_app(settings)) as proxy, httpx.Client(base_url=proxy.base) as client:
        status = lambda: client.get("/admin/onboarding").json()["models"]["fresh"]  # noqa: E731
        wait_for(status, lambda s: s["questions_done"] >= 2)
        up.queue("fresh", fail(503, "upstream down"))  # the next request fails: 1 s backoff
        stalled = wait_for(status, lambda s: s["status"] in ("stalled", "done"), every=0.005)
        assert stalled["status"] == "stalled" and "http_503" in stalled["reason"]
        done = wait_for(status, lambda s: s["status"] == "done")
        assert (done["questions_done"], done["accuracy_so_far"]) == (12, 0.5)
    answered = [b["messages"][-1]["content"] for b in up.bodies("fresh")]
    assert len(answered) == 12 + 1  # the failed one was asked again, nothing else


def test_a_run_cut_by_shutdown_is_no_crash_and_gives_up_its_lease(tmp_path, up, caplog):
    """The runs stop before the state store closes: no 'crashed' (a write to a closed store) and
    no lease left held, so the next start resumes at once."""
    from proxy.store import Store

    suite, data = tiny_suite_files(tmp_path)
    up.set("fresh", answer("The answer is (A).", delay=0.5))
    config = tmp_path / "providers.yaml"
    write_providers(config, [model_entry("fresh", up.url, tmp_path)])
    settings = Settings(config=config, scorer="constant", reload_interval_s=0.1, onboarding=True,
                        state_dir=tmp_path / "state", onboarding_data=data, onboarding_suite=str(suite))
    with ProxyServer(create_app(settings)) as proxy, httpx.Client(base_url=proxy.base, timeout=10) as client:
        wait_for(lambda: client.get("/admin/onboarding").json()["models"],
                 lambda s: s["fresh"]["status"] == "running")
    assert "crashed" not in caplog.text and "closed database" not in caplog.text
    with Store(tmp_path / "state") as store:
        row = store._db.execute("SELECT owner FROM onboarding WHERE model = 'fresh'").fetchone()
    assert row is not None and row[0] is None
