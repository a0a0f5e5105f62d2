"""End to end on real data: the proxy onboards a replayed model, survives a kill, then routes to it.

The replay upstream answers every aptitude question as Phi-3-mini-4k-instruct did (its recorded
generations in ../shared/data/mmlu_pro). The proxy runs as a real process (SIGKILL-able) with a
per-subject profile-lookup scorer standing in for Model-SAT (tests/onboarding/proxy_process.py), so
that "auto routes to the model on the subjects it is strong on" is a property of the profile alone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from proxy.localserver import free_port
from scorer.aptitude import load_builtin_profile, load_suite, profile_from_outcomes, subject_of
from scorer.data import load_dataset
from onboarding.fakes import wait_for
from support.replay_upstream import ReplayUpstream

pytestmark = pytest.mark.data

NEW = "Phi-3-mini-4k-instruct"  # onboarded through the replay of its recorded generations
OLD = "gemma-7b"  # already known: its built-in profile
LAUNCHER = Path(__file__).with_name("proxy_process.py")


def _entry(name: str, base: str, profile: str | None = None) -> dict:
    info = {"input_price_per_mtok": 0.0, "output_price_per_mtok": 0.0}
    if profile:
        info["capability_profile"] = profile
    return {"model_name": name, "litellm_params": {"model": f"openai/{name}", "api_base": base},
            "model_info": info}


def _write(path: Path, models: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"model_list": models, "router_settings": {
        "timeout_s": 10, "deadline_s": 20, "retry_backoff_s": 0.05}}))
    tmp.replace(path)


class Proxy:
    def __init__(self, env: dict, port: int):
        self.env, self.port, self.proc = env, port, None
        self.base = f"http://127.0.0.1:{port}"

    def start(self) -> "Proxy":
        self.proc = subprocess.Popen([sys.executable, str(LAUNCHER)], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("proxy did not start")

    def onboarding(self) -> dict:
        return httpx.get(f"{self.base}/admin/onboarding", timeout=5).json()["models"]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


def _question_of(data, subject: str) -> str:
    """A short test-split question of this subject (never one of the aptitude suite's)."""
    for p in data.prompts:
        if p.split == "test" and subject_of(p) == subject and len(p.question) < 800:
            return p.question
    raise AssertionError(f"no test question for {subject}")


def test_onboard_kill_resume_and_route(tmp_path, shared_data):
    folder = shared_data / "mmlu_pro"
    suite = load_suite("mmlu_pro")
    data = load_dataset(folder)
    expected = profile_from_outcomes(suite, data, NEW)
    old = load_builtin_profile(f"builtin:mmlu_pro/{OLD}")["tasks"]
    strong = max(expected, key=lambda t: expected[t] - old[t])  # NEW's best subject against OLD
    weak = max(expected, key=lambda t: old[t] - expected[t])
    assert expected[strong] > old[strong] and old[weak] > expected[weak]

    config = tmp_path / "providers.yaml"
    port = free_port()
    env = {**os.environ, "SATROUTE_CONFIG": str(config), "SATROUTE_PORT": str(port),
           "SATROUTE_STATE_DIR": str(tmp_path / "state"), "SATROUTE_ONBOARDING": "true",
           "SATROUTE_ONBOARDING_DATA": str(folder), "SATROUTE_ONBOARDING_CONCURRENCY": "32",
           "SATROUTE_RELOAD_INTERVAL_S": "0.1", "SATROUTE_LOG_LEVEL": "warning",
           "SATROUTE_TEST_PROMPTS": str(folder / "prompts.jsonl.gz")}
    chat = lambda proxy, q: httpx.post(  # noqa: E731
        f"{proxy.base}/v1/chat/completions", timeout=20,
        json={"model": "auto", "messages": [{"role": "user", "content": q}]})

    with ReplayUpstream(folder, [NEW, OLD], prefer=suite.question_ids) as up:
        _write(config, [_entry(OLD, up.url, f"builtin:mmlu_pro/{OLD}")])
        proxy = Proxy(env, port).start()
        try:
            # the admin adds the new model; the reload starts its onboarding in the background
            _write(config, [_entry(OLD, up.url, f"builtin:mmlu_pro/{OLD}"), _entry(NEW, up.url)])
            wait_for(proxy.onboarding, lambda m: m.get(NEW, {}).get("questions_done", 0) >= 200)
            r = chat(proxy, _question_of(data, strong))
            assert r.headers["x-satroute-model"] == OLD  # not a candidate before it is done
            up.pause()  # halfway: hold the upstream, let what was answered be stored, kill
            wait_for(proxy.onboarding, lambda m: m[NEW]["questions_done"] == len(up.answered[NEW]),
                  timeout=10)
            done_at_kill = proxy.onboarding()[NEW]["questions_done"]
            assert 0 < done_at_kill < 1000
            proxy.stop(signal.SIGKILL)
        finally:
            proxy.stop(signal.SIGKILL)
        up.drop_waiting()  # the requests the dead proxy left in flight end unanswered

        proxy = Proxy(env, port).start()
        try:
            status = wait_for(proxy.onboarding, lambda m: m[NEW]["status"] == "done")[NEW]
            assert (status["questions_done"], status["questions_total"]) == (1000, 1000)
            profile = httpx.get(f"{proxy.base}/admin/models/{NEW}/profile", timeout=5).json()
            assert profile["source"] == "onboarding" and profile["suite"] == "mmlu_pro"
            assert profile["tasks"] == pytest.approx(expected, abs=1e-12)
            assert chat(proxy, _question_of(data, strong)).headers["x-satroute-model"] == NEW
            assert chat(proxy, _question_of(data, weak)).headers["x-satroute-model"] == OLD
        finally:
            proxy.stop()

    asked = set(suite.question_ids)  # the routed chats above are not aptitude questions
    answered = Counter(q for q in up.answered[NEW] if q in asked)
    assert max(answered.values()) == 1, "a question was answered twice"
    assert set(answered) == asked
    twice = {q for q, n in Counter(q for q in up.received[NEW] if q in asked).items() if n > 1}
    assert twice <= set(up.dropped[NEW])  # only what was in flight at the kill was sent again
    assert len(up.dropped[NEW]) <= 32
    print(f"\nkilled at {done_at_kill}/1000 answered; {len(up.dropped[NEW])} in flight dropped, "
          f"{len(twice)} of them sent again after the restart")
