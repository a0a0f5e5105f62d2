"""The real Model-SAT scorer takes an onboarded model as a candidate as soon as its test is done.

In-process proxy with the committed default checkpoint (the real scorer, loaded as `satroute serve`
loads it), the replay upstream answering as Phi-3-mini-4k-instruct did: once onboarding is done,
`auto` scores both models, the new one through the profile the store holds (data + backbone).
Which of the two wins is the scorer's business; the routing-by-profile test is test_e2e_replay.py.
"""
from __future__ import annotations

import httpx
import pytest
import yaml

from onboarding.fakes import wait_for
from proxy.app import create_app
from proxy.settings import Settings
from scorer.aptitude import load_suite
from support.proxy_server import ProxyServer
from support.replay_upstream import ReplayUpstream

pytestmark = [pytest.mark.data, pytest.mark.backbone]

NEW, OLD = "Phi-3-mini-4k-instruct", "gemma-7b"


def test_real_scorer_routes_over_the_onboarded_profile(tmp_path, shared_data):
    folder = shared_data / "mmlu_pro"
    suite = load_suite("mmlu_pro")
    config = tmp_path / "providers.yaml"
    with ReplayUpstream(folder, [NEW, OLD], prefer=suite.question_ids) as up:
        def entry(name, profile=None):
            info = {"capability_profile": profile} if profile else {}
            return {"model_name": name, "model_info": info,
                    "litellm_params": {"model": f"openai/{name}", "api_base": up.url}}

        config.write_text(yaml.safe_dump({"model_list": [entry(OLD, f"builtin:mmlu_pro/{OLD}"),
                                                         entry(NEW)]}))
        settings = Settings(config=config, scorer="modelsat", scorer_threads=1, onboarding=True,
                            state_dir=tmp_path / "state", onboarding_data=folder,
                            onboarding_concurrency=32, reload_interval_s=0.2)
        chat = {"model": "auto", "messages": [{"role": "user", "content":
                                               "What is the derivative of x**3 with respect to x?"}]}
        with ProxyServer(create_app(settings)) as proxy, httpx.Client(base_url=proxy.base,
                                                                        timeout=60) as client:
            status = lambda: client.get("/admin/onboarding").json()["models"][NEW]  # noqa: E731
            wait_for(status, lambda s: s["status"] == "done", timeout=120)
            wait_for(lambda: client.get("/ready").status_code, lambda c: c == 200, timeout=120)
            r = client.post("/v1/chat/completions", json=chat)
            assert r.status_code == 200
            scores = dict(kv.split("=") for kv in r.headers["x-satroute-scores"].split(","))
            assert set(scores) == {NEW, OLD}
            assert all(float(v) == float(v) for v in scores.values())  # finite, not NaN
            assert r.headers["x-satroute-model"] in (NEW, OLD)
