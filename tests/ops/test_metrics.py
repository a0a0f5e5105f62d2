"""The app-owned Prometheus registry: each observe_* moves the right series; /metrics renders it."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from proxy.metrics import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_two_apps_never_share_counters():
    a, b = Metrics(), Metrics()
    a.observe_request("m1", 200)
    assert _samples(a)[("satroute_requests_total", (("model", "m1"), ("status", "200")))] == 1
    assert not any(k[0] == "satroute_requests_total" for k in _samples(b))


def test_every_observation_lands_in_its_series():
    m = Metrics()
    m.observe_request("m1", 200)
    m.observe_request("m1", 200)
    m.observe_request(None, 404)
    m.observe_routing("m1")
    m.observe_scoring(0.03)
    m.observe_upstream("m1", 0.2)
    m.observe_fallback("m1", "m2")
    m.observe_retry("m1")
    m.observe_cooldown("m1")
    m.observe_onboarding("new", answered=120, total=1000, state="running")
    m.observe_local_server("smollm2", "ready")
    m.observe_local_server("smollm2", "exited")
    m.observe_local_server("smollm2", "restarting")
    s = _samples(m)
    assert s[("satroute_requests_total", (("model", "m1"), ("status", "200")))] == 2
    assert s[("satroute_requests_total", (("model", "none"), ("status", "404")))] == 1
    assert s[("satroute_routing_decisions_total", (("model", "m1"),))] == 1
    assert s[("satroute_scorer_latency_seconds_count", ())] == 1
    assert s[("satroute_scorer_latency_seconds_bucket", (("le", "0.05"),))] == 1
    assert s[("satroute_scorer_latency_seconds_bucket", (("le", "0.025"),))] == 0
    assert s[("satroute_upstream_latency_seconds_sum", (("model", "m1"),))] == 0.2
    assert s[("satroute_fallbacks_total", (("from_model", "m1"), ("to_model", "m2")))] == 1
    assert s[("satroute_retries_total", (("model", "m1"),))] == 1
    assert s[("satroute_cooldowns_total", (("model", "m1"),))] == 1
    assert s[("satroute_onboarding_questions_answered", (("model", "new"),))] == 120
    assert s[("satroute_onboarding_questions", (("model", "new"),))] == 1000
    assert s[("satroute_onboarding_state", (("model", "new"), ("state", "running")))] == 1
    assert s[("satroute_onboarding_state", (("model", "new"), ("state", "done")))] == 0
    assert s[("satroute_local_server_up", (("name", "smollm2"),))] == 0
    assert s[("satroute_local_server_restarts_total", (("name", "smollm2"),))] == 1


def test_onboarding_state_moves_to_done():
    m = Metrics()
    m.observe_onboarding("new", 10, 1000, "running")
    m.observe_onboarding("new", 1000, 1000, "done")
    s = _samples(m)
    assert s[("satroute_onboarding_state", (("model", "new"), ("state", "done")))] == 1
    assert s[("satroute_onboarding_state", (("model", "new"), ("state", "running")))] == 0


def test_a_local_server_removed_from_the_file_leaves_no_series():
    """A gauge stuck at 0 for a model removed on purpose would fire an "is it down?" alert."""
    m = Metrics()
    for event in ("ready", "restarting", "stopped"):
        m.observe_local_server("gone", event)
    m.observe_local_server("kept", "ready")
    m.observe_local_server("gone", "removed")
    m.observe_local_server("never-started", "removed")
    names = {labels for (metric, labels) in _samples(m) if metric.startswith("satroute_local_server")}
    assert names == {(("name", "kept"),)}


def test_a_model_removed_from_the_file_leaves_no_series():
    """Renamed models would otherwise grow /metrics by some 16 lines each, for ever."""
    m = Metrics()
    for model in ("gone", "kept"):
        m.observe_request(model, 200)
        m.observe_request(model, 502)
        m.observe_routing(model)
        m.observe_upstream(model, 0.2)
        m.observe_retry(model)
        m.observe_cooldown(model)
        m.stream_errors.labels(model=model).inc()
    m.observe_fallback("gone", "kept")
    m.observe_fallback("kept", "gone")
    m.observe_request(None, 404)
    m.forget_model("gone")
    m.forget_model("never-seen")
    left = _samples(m)
    assert not any("gone" in dict(labels).values() for _, labels in left)
    assert left[("satroute_requests_total", (("model", "kept"), ("status", "502")))] == 1
    assert left[("satroute_requests_total", (("model", "none"), ("status", "404")))] == 1
    assert left[("satroute_upstream_latency_seconds_count", (("model", "kept"),))] == 1
    assert left[("satroute_retries_total", (("model", "kept"),))] == 1


def test_a_removed_model_s_last_requests_do_not_bring_its_series_back_until_it_is_back():
    m = Metrics()
    m.follow_models(["gone", "kept"], ["kept"])
    m.observe_request("gone", 200)  # its old local server was still answering
    m.observe_upstream("gone", 0.1)
    m.observe_fallback("kept", "gone")
    m.observe_routing("gone")
    assert not any("gone" in dict(labels).values() for _, labels in _samples(m))
    m.follow_models(["kept"], ["kept", "gone"])  # listed again: counted again
    m.observe_request("gone", 200)
    assert _samples(m)[("satroute_requests_total", (("model", "gone"), ("status", "200")))] == 1


def test_metrics_endpoint_serves_prometheus_text():
    m = Metrics()
    m.observe_request("m1", 502)
    app = Starlette(routes=[Route("/metrics", m.endpoint)])
    with TestClient(app) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert 'satroute_requests_total{model="m1",status="502"} 1.0' in response.text


def test_request_records_count_chat_completions_by_answering_model_never_by_client_names():
    from proxy.logs import RequestRecord

    m = Metrics()
    m.observe_record(RequestRecord("r1", "POST", "/v1/chat/completions", status=200,
                                   requested_model="auto", routed_model="m2"))
    m.observe_record(RequestRecord("r2", "POST", "/v1/chat/completions", status=404,
                                   requested_model="nope"))
    m.observe_record(RequestRecord("r3", "GET", "/v1/models", status=200))
    s = _samples(m)
    assert s[("satroute_requests_total", (("model", "m2"), ("status", "200")))] == 1
    assert s[("satroute_requests_total", (("model", "none"), ("status", "404")))] == 1
    assert sum(v for k, v in s.items() if k[0] == "satroute_requests_total") == 2


def test_only_posts_to_the_chat_route_count_as_chat_completions():
    from proxy.logs import RequestRecord

    m = Metrics()
    for method, path, status in (("POST", "/v1/chat/completions", 200), ("POST", "/chat/completions", 400),
                                 ("GET", "/v1/chat/completions", 405),
                                 ("POST", "/v1/models/x/chat/completions", 404)):
        m.observe_record(RequestRecord("r", method, path, status=status, routed_model="m1" if status == 200 else None))
    s = _samples(m)
    assert {k: v for k, v in s.items() if k[0] == "satroute_requests_total"} == {
        ("satroute_requests_total", (("model", "m1"), ("status", "200"))): 1,
        ("satroute_requests_total", (("model", "none"), ("status", "400"))): 1}
