"""With onboarding off, a profile onboarding stored earlier (or `satroute onboard` run by hand):
routed and shown, with its suite, only while the model's upstream is the one it was measured on."""
from __future__ import annotations

import time
from pathlib import Path

import httpx

from conftest import model_entry, write_config
from proxy.providers import parse, upstream_fingerprint
from proxy.store import Store


def _stored_fresh(tmp_path, upstream) -> tuple[dict, Path]:
    """m1, and "fresh" with no profile in providers.yaml but one onboarding stored for its
    upstream (t1: 0.9, suite mmlu_pro)."""
    fresh = model_entry("fresh", upstream.url, profile=False)
    path = write_config(tmp_path / "providers.yaml", [model_entry("m1", upstream.url, tmp_path), fresh])
    measured_on = upstream_fingerprint(parse(path.read_text(), path, {}, lambda d: None).models["fresh"])
    with Store(tmp_path / "state") as store:
        store.begin("fresh", "mmlu_pro", total=1, upstream=measured_on)
        store.finish("fresh", "mmlu_pro", {"t1": 0.9})
    return fresh, path


def test_a_stored_profile_is_used_and_shown_only_for_its_upstream(tmp_path, upstream, start_proxy):
    fresh, path = _stored_fresh(tmp_path, upstream)
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


def test_a_renamed_model_s_stored_profile_is_shown_and_carried_to_the_new_name(tmp_path, upstream,
                                                                              start_proxy):
    """A rename onboards the model again under its new name; the profile the store holds under
    the old name is still shown, and saved as a capability_profile it serves the new name."""
    fresh, path = _stored_fresh(tmp_path, upstream)
    renamed = dict(fresh, model_name="renamed")
    write_config(path, [model_entry("m1", upstream.url, tmp_path), renamed])
    proxy = start_proxy(path, onboarding=False)

    old = httpx.get(f"{proxy.base}/admin/models/fresh/profile")
    assert old.status_code == 200
    assert old.json() == {"model": "fresh", "suite": "mmlu_pro", "source": "onboarding",
                          "configured": False, "tasks": {"t1": 0.9}}
    missing = httpx.get(f"{proxy.base}/admin/models/never-there/profile")
    assert missing.status_code == 404 and "no model 'never-there'" in missing.json()["error"]["message"]
    assert httpx.get(f"{proxy.base}/admin/models/renamed/profile").status_code == 404

    (tmp_path / "renamed.profile.json").write_text(old.text)
    renamed["model_info"] = {"capability_profile": "renamed.profile.json"}
    write_config(path, [model_entry("m1", upstream.url, tmp_path), renamed])
    deadline = time.monotonic() + 5
    while (now := httpx.get(f"{proxy.base}/admin/models/renamed/profile")).status_code != 200:
        assert time.monotonic() < deadline, now.text
        time.sleep(0.05)
    assert now.json() == {"model": "renamed", "suite": "mmlu_pro", "source": "providers.yaml",
                          "tasks": {"t1": 0.9}}
