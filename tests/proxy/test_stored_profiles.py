"""With onboarding off, a profile onboarding stored earlier (or `satroute onboard` run by hand):
routed and shown, with its suite, only while the model's upstream is the one it was measured on."""
from __future__ import annotations

import time

import httpx

from conftest import model_entry, write_config
from proxy.providers import parse, upstream_fingerprint
from proxy.store import Store


def test_a_stored_profile_is_used_and_shown_only_for_its_upstream(tmp_path, upstream, start_proxy):
    fresh = model_entry("fresh", upstream.url, profile=False)
    path = write_config(tmp_path / "providers.yaml", [model_entry("m1", upstream.url, tmp_path), fresh])
    measured_on = upstream_fingerprint(parse(path.read_text(), path, {}, lambda d: None).models["fresh"])
    with Store(tmp_path / "state") as store:
        store.begin("fresh", "mmlu_pro", total=1, upstream=measured_on)
        store.finish("fresh", "mmlu_pro", {"t1": 0.9})
    proxy = start_proxy(path, onboarding=False)

    def profile() -> httpx.Response:
        return httpx.get(f"{proxy.base}/admin/models/fresh/profile")

    assert profile().json() == {"model": "fresh", "suite": "mmlu_pro", "source": "onboarding",
                                "tasks": {"t1": 0.9}}
    # the same name now names another upstream: the stored profile is not its profile
    fresh["litellm_params"]["api_base"] = upstream.url.replace("127.0.0.1", "localhost")
    write_config(path, [model_entry("m1", upstream.url, tmp_path), fresh])
    deadline = time.monotonic() + 5
    while profile().status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert profile().json()["error"]["code"] == "profile_not_found"
    status = httpx.get(f"{proxy.base}/admin/onboarding").json()["models"]["fresh"]
    assert status["status"] == "pending" and status["profile_source"] is None
