"""Operations wired into the real app: /metrics, request ids and log lines, /openapi.json, the
default model while nothing is routable, unavailable models reported by /ready."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from proxy.app import create_app
from proxy.logs import JsonFormatter, configure_logging
from proxy.settings import Settings
from support.mock_upstream import MockUpstream, fail, rate_limit
from support.prometheus import scrape, scrape_with
from support.proxy_server import ProxyServer

MESSAGES = [{"role": "user", "content": "Integrate x^2 from 0 to 3."}]
FAST = {"num_retries": 1, "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.02, "timeout_s": 2,
        "deadline_s": 8, "max_fallbacks": 2, "allowed_fails": 2, "cooldown_s": 30}


class PreferScorer:
    def __init__(self, best: str):
        self.best = best

    def score(self, instruction, candidates):
        return {name: (1.0 if name == self.best else 0.1) for name in candidates}


def _entry(name: str, base: str, folder: Path, *, profile: bool = True, key: str | None = None):
    info = {}
    if profile:
        (folder / f"{name}.json").write_text('{"model": "%s", "tasks": {"t1": 0.5}}' % name)
        info["capability_profile"] = f"{name}.json"
    params = {"model": f"openai/{name}", "api_base": base}
    if key:
        params["api_key"] = key
    return {"model_name": name, "litellm_params": params, "model_info": info}


def _config(folder: Path, models: list, **router) -> Path:
    path = folder / "providers.yaml"
    path.write_text(yaml.safe_dump({"model_list": models, "router_settings": {**FAST, **router}}))
    return path


@pytest.fixture
def upstream():
    with MockUpstream() as up:
        yield up


def _serve(config: Path, fake=None, **settings) -> ProxyServer:
    opts = {"config": config, "scorer": "constant", "reload_interval_s": 0.1, "onboarding": False,
            "state_dir": config.parent / "state", **settings}
    return ProxyServer(create_app(Settings(**opts), scorer=fake))  # started by `with`


def test_a_routed_request_is_counted_logged_once_and_carries_its_request_id(
        tmp_path, upstream, caplog):
    caplog.set_level(logging.INFO, logger="satroute.request")
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path),
                                _entry("m2", upstream.url, tmp_path)])
    with _serve(config, fake=PreferScorer("m2")) as proxy:
        client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        completion = raw.parse()
        rid = raw.headers["x-request-id"]
        metrics = scrape(proxy.base)
        openapi = httpx.get(f"{proxy.base}/openapi.json").json()
    assert completion.model == "m2" and rid.startswith("req_")
    [line] = [r.fields for r in caplog.records if r.name == "satroute.request"
              and r.fields["path"] == "/v1/chat/completions"]
    assert line["request_id"] == rid and line["routed_model"] == "m2"
    assert line["requested_model"] == "auto" and 0 < line["upstream_ms"] <= line["total_ms"]
    assert line["scores"] == {"m2": 1.0, "m1": 0.1} and line["scorer_ms"] >= 0
    assert line["usage"]["total_tokens"] > 0
    assert "Integrate" not in str(line)
    assert metrics[("satroute_requests_total", (("model", "m2"), ("status", "200")))] == 1
    assert metrics[("satroute_routing_decisions_total", (("model", "m2"),))] == 1
    assert metrics[("satroute_scorer_latency_seconds_count", ())] == 1
    assert metrics[("satroute_upstream_latency_seconds_count", (("model", "m2"),))] == 1
    assert {"/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics",
            "/openapi.json", "/admin/route"} <= set(openapi["paths"])
    assert "ChatCompletionRequest" in openapi["paths"]["/admin/route"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["$ref"]


def test_the_log_line_of_a_failed_request_says_which_models_failed_and_that_it_was_a_stream(
        tmp_path, upstream):
    out = io.StringIO()
    configure_logging("info", stream=out)  # as `satroute serve` does; undone after the test
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path), _entry("m2", upstream.url, tmp_path)],
                     num_retries=0)
    upstream.set("m1", fail(503))
    upstream.set("m2", fail(500))
    with _serve(config, fake=PreferScorer("m2")) as proxy:
        client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="auto", messages=MESSAGES, stream=True)
        upstream.set("m1", fail(400, "bad prompt"))
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m1", messages=MESSAGES)
    logged = [json.loads(line) for line in out.getvalue().splitlines()]
    lines = [line for line in logged if line["logger"] == "satroute.request"
             and line["path"] == "/v1/chat/completions"]
    assert [(line["status"], line["stream"], line["failed_models"]) for line in lines] == [
        (502, True, ["m2:http_500", "m1:http_503"]), (400, False, ["m1:http_400"])]
    # a routed request no model answered was scored all the same: its line says so, as an
    # answer's line does (and a request that named its model has no scores)
    assert set(lines[0]["scores"]) == {"m1", "m2"} and lines[0]["scorer_ms"] >= 0
    assert "scores" not in lines[1] and "scorer_ms" not in lines[1]
    # the dispatch warnings that say why each model failed carry the request's id
    rid = err.value.response.headers["x-request-id"]
    warned = [line for line in logged if line["logger"] == "satroute.dispatch"]
    assert [line.get("request_id") for line in warned[:2]] == [rid, rid]
    assert not [line for line in logged if line["logger"] == "satroute.app" and "request_id" in line]


def test_a_request_sent_again_is_routed_with_its_remembered_scores(tmp_path, upstream):
    """A client's retry or a frontend's "regenerate" sends the same chat again: it is routed as
    before without scoring again, and the scorer latency histogram counts only calls that ran."""
    calls = []

    class Counting(PreferScorer):
        def score(self, instruction, candidates):
            calls.append(instruction)
            return super().score(instruction, candidates)

    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path),
                                _entry("m2", upstream.url, tmp_path)])
    with _serve(config, fake=Counting("m2")) as proxy:
        client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
        first, again = (client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
                        for _ in range(2))
        other = [{"role": "user", "content": "Name three prime numbers."}]
        assert client.chat.completions.create(model="auto", messages=other).model == "m2"
        metrics = scrape(proxy.base)
    assert first.parse().model == again.parse().model == "m2"
    assert again.headers["x-satroute-scores"] == first.headers["x-satroute-scores"] == "m2=1.0000,m1=0.1000"
    assert again.headers["x-satroute-route"] == "routed"
    assert len(calls) == 2 and calls[0] != calls[1]  # the first chat and the other one
    assert metrics[("satroute_scorer_remembered_total", ())] == 1
    assert metrics[("satroute_scorer_latency_seconds_count", ())] == 2
    assert metrics[("satroute_routing_decisions_total", (("model", "m2"),))] == 3


def test_a_scoring_call_slower_than_the_scorer_timeout_is_still_in_the_latency_histogram(tmp_path, upstream):
    class Slow:
        def score(self, instruction, candidates):
            time.sleep(1.2)
            return {name: 1.0 for name in candidates}

    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path), _entry("m2", upstream.url, tmp_path)],
                     scorer_timeout_s=0.2)
    with _serve(config, fake=Slow()) as proxy:
        client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
        resp = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert resp.headers["x-satroute-degraded"] == "scorer_timeout"
        waited = time.monotonic() + 10
        while (metrics := scrape(proxy.base)).get(("satroute_scorer_latency_seconds_count", ())) != 1:
            assert time.monotonic() < waited, "the scoring call that ran never reached the histogram"
            time.sleep(0.1)
    # the call's own time, past the request's timeout: the buckets above it can fill
    assert metrics[("satroute_scorer_latency_seconds_sum", ())] >= 1.2
    assert metrics[("satroute_scorer_latency_seconds_bucket", (("le", "1.0"),))] == 0


def test_retries_fallbacks_and_cooldowns_are_counted(tmp_path, upstream):
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path),
                                _entry("m2", upstream.url, tmp_path)])
    upstream.set("m2", fail(503))
    with _serve(config, fake=PreferScorer("m2")) as proxy:
        client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
        assert client.chat.completions.create(model="auto", messages=MESSAGES).model == "m1"
        metrics = scrape(proxy.base)
    assert metrics[("satroute_retries_total", (("model", "m2"),))] == 1
    assert metrics[("satroute_fallbacks_total", (("from_model", "m2"), ("to_model", "m1")))] == 1
    assert metrics[("satroute_cooldowns_total", (("model", "m2"),))] == 1
    assert metrics[("satroute_requests_total", (("model", "m1"), ("status", "200")))] == 1


def test_metrics_need_the_master_key_when_one_is_set(tmp_path, upstream):
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path)])
    with _serve(config, master_key="mk-0123456789") as proxy:
        assert httpx.get(f"{proxy.base}/metrics").status_code == 401
        ok = httpx.get(f"{proxy.base}/metrics", headers={"authorization": "Bearer mk-0123456789"})
        assert ok.status_code == 200 and "satroute_requests_total" in ok.text


def test_a_master_key_read_from_a_file_with_its_line_break_is_the_key_without_it(tmp_path, upstream):
    """`SATROUTE_MASTER_KEY=$(cat key)` keeps the line break of a secret file: kept in the key,
    no client could ever send it, and every request was refused."""
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path)])
    with _serve(config, master_key="mk-0123456789\n") as proxy:
        assert httpx.get(f"{proxy.base}/v1/models").status_code == 401
        ok = httpx.get(f"{proxy.base}/v1/models", headers={"authorization": "Bearer mk-0123456789"})
        assert ok.status_code == 200
    assert Settings(master_key=" \n").master_key_value() is None


def test_the_route_preview_decides_as_a_request_would_and_calls_no_model(tmp_path, upstream, caplog):
    """POST /admin/route: the admin's "where would this go?", with the real decision (candidates,
    scores, fallback order, the text the scorer read) and nothing sent upstream or counted."""
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path), _entry("m2", upstream.url, tmp_path),
                                _entry("m3", upstream.url, tmp_path)], max_fallbacks=1)
    key = {"authorization": "Bearer mk-0123456789"}
    chat = [{"role": "user", "content": "What is a prime?"}, {"role": "assistant", "content": "A number."},
            {"role": "user", "content": "Name three."}]
    caplog.set_level(logging.INFO, logger="satroute.request")
    with _serve(config, fake=PreferScorer("m2"), master_key="mk-0123456789") as proxy:
        preview = f"{proxy.base}/admin/route"
        assert httpx.post(preview, json={"model": "auto", "messages": chat}).status_code == 401
        routed = httpx.post(preview, json={"model": "auto", "messages": chat}, headers=key).json()
        # the same text again, as another client of the key would send it
        again = httpx.post(preview, json={"model": "auto", "messages": chat}, headers=key).json()
        narrowed = httpx.post(preview, headers=key, json={"model": "auto", "messages": chat,
                                                          "satroute": {"models": ["m1", "m3"]}}).json()
        direct = httpx.post(preview, json={"model": "m3", "messages": chat}, headers=key).json()
        unknown = httpx.post(preview, json={"model": "m9", "messages": chat}, headers=key)
        empty = httpx.post(preview, json={"model": "auto"}, headers=key)
        metrics = scrape_with(proxy.base, key)
        logged = httpx.get(f"{proxy.base}/admin/routes", headers=key).json()["data"]
        sent = upstream.bodies()
        client = openai.OpenAI(base_url=proxy.url, api_key="mk-0123456789", max_retries=0)
        real = client.chat.completions.with_raw_response.create(model="auto", messages=chat)
        deadline = time.time() + 10
        while not (after := httpx.get(f"{proxy.base}/admin/routes", headers=key).json()["data"]) \
                and time.time() < deadline:
            time.sleep(0.1)  # the routing log is written in batches
        remembered = scrape_with(proxy.base, key)[("satroute_scorer_remembered_total", ())]
    assert routed["chosen"] == "m2" and routed["route"] == "routed" and routed["degraded"] is None
    assert routed["ranked"] == [{"model": "m2", "score": 1.0}, {"model": "m1", "score": 0.1},
                                {"model": "m3", "score": 0.1}]
    assert routed["tries"] == ["m2", "m1"]  # the choice, then max_fallbacks more
    assert routed["instruction"] == "Name three.\n\nA number.\n\nWhat is a prime?"  # the request first
    assert routed["scorer_ms"] >= 0
    # whether another request of the same text left its scores is not told (its timing is:
    # docs/configuration.md, "Previewing a decision")
    assert again["ranked"] == routed["ranked"] and "remembered" not in routed and "remembered" not in again
    assert narrowed["chosen"] == "m1" and [r["model"] for r in narrowed["ranked"]] == ["m1", "m3"]
    assert direct == {"chosen": "m3", "route": "direct", "degraded": None, "ranked": [], "tries": ["m3"],
                      "scorer_ms": None, "instruction": None}
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert empty.status_code == 400
    assert sent == [] and logged == []  # no model called, nothing in the routing log
    assert not any(name.startswith("satroute_routing_decisions") for name, _ in metrics)
    # the real request then routes the same way, with the scores the preview left behind
    assert real.parse().model == "m2" and real.headers["x-satroute-scores"] == "m2=1.0000,m1=0.1000,m3=0.1000"
    assert remembered == 1 and [(r["chosen"], r["requested"]) for r in after] == [("m2", "auto")]
    lines = [r.fields for r in caplog.records if r.name == "satroute.request"]
    previews = [f for f in lines if f["path"] == "/admin/route"]
    assert len(previews) == 7 and not any(f.get("routed_model") for f in previews)  # nothing answered


def test_browser_frontends_get_cors_when_origins_are_configured(tmp_path, upstream):
    """A browser client (Open WebUI's direct connections, a web chat in client mode) sends a
    preflight without the key; the answer's routing headers must be readable by its script."""
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path)])
    origin = "https://chat.example"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    key = {"authorization": "Bearer mk-0123456789"}
    body = {"model": "m1", "messages": MESSAGES}
    with _serve(config, master_key="mk-0123456789", cors_origins=f"{origin}/, https://other.example") as proxy:
        pre = httpx.options(f"{proxy.url}/chat/completions", headers=preflight)
        answer = httpx.post(f"{proxy.url}/chat/completions", json=body, headers={**key, "Origin": origin})
        refused = httpx.post(f"{proxy.url}/chat/completions", json=body, headers={"Origin": origin})
        stranger = httpx.options(f"{proxy.url}/chat/completions",
                                 headers={**preflight, "Origin": "https://evil.example"})
    with _serve(config) as proxy:  # not configured: no CORS at all, as before
        plain = httpx.options(f"{proxy.url}/chat/completions", headers=preflight)
        unmarked = httpx.post(f"{proxy.url}/chat/completions", json=body, headers={"Origin": origin})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
    exposed = answer.headers["access-control-expose-headers"].lower()
    assert "x-satroute-model" in exposed and "x-request-id" in exposed
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin
    assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers
    # not configured: no CORS headers; without a master key a page's requests are refused (403)
    assert plain.status_code == 403 and "access-control-allow-origin" not in unmarked.headers


def test_without_a_master_key_a_web_page_cannot_use_the_proxy(tmp_path, upstream):
    """No key, on loopback (the default): a page on any site could send a simple cross-site POST
    (text/plain, no preflight) and spend the providers' keys, or, renaming the address through DNS
    rebinding, read the answers and /admin. Such requests are refused (403); clients that are not
    browsers, pages on this machine, desktop apps and listed origins are served as before."""
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path)])
    chat = json.dumps({"model": "m1", "messages": MESSAGES})
    simple = {"Content-Type": "text/plain"}  # what a page sends without a preflight
    with _serve(config, cors_origins="https://chat.example") as proxy:
        url = f"{proxy.url}/chat/completions"

        def post(**headers):
            return httpx.post(url, content=chat, headers={**simple, **headers})

        cross_site = post(Origin="https://evil.example")
        rebound = httpx.get(f"{proxy.base}/admin/routes", headers={"Host": "rebind.evil.example"})
        rebound_v6 = httpx.get(f"{proxy.base}/v1/models", headers={"Host": "[2001:db8::1]:8000"})
        served = [post(), post(Origin="https://chat.example"), post(Origin="http://localhost:3000"),
                  post(Origin="http://127.0.0.1:8080"), post(Origin="app://chatbox"),
                  post(Origin="vscode-webview://abc"), post(Origin="http://tauri.localhost"),
                  post(Origin="https://tauri.localhost"), post(Host="localhost:8000"),
                  post(Host="app.localhost:8000"),
                  post(Host="[::1]:8000")]
        probes = httpx.get(f"{proxy.base}/health", headers={"Host": "rebind.evil.example"})
    assert cross_site.status_code == 403 and cross_site.json()["error"]["code"] == "forbidden_origin"
    assert "SATROUTE_MASTER_KEY" in cross_site.json()["error"]["message"]
    assert rebound.status_code == 403 and "loopback" in rebound.json()["error"]["message"]
    assert rebound_v6.status_code == 403
    assert [r.status_code for r in served] == [200] * len(served)
    assert probes.status_code == 200
    assert len(upstream.bodies("m1")) == len(served)  # nothing was sent for the refused ones
    with _serve(config, master_key="mk-0123456789") as proxy:  # with a key, the key decides
        keyed = httpx.post(f"{proxy.url}/chat/completions", content=chat,
                           headers={**simple, "Origin": "https://evil.example",
                                    "authorization": "Bearer mk-0123456789"})
    with _serve(config, host="0.0.0.0") as proxy:  # not on loopback: any name reaches it
        named = httpx.post(f"{proxy.url}/chat/completions", content=chat,
                           headers={**simple, "Host": "satroute:8000"})
    assert keyed.status_code == 200 and named.status_code == 200
    # a page loaded from a file (a desktop app's) sends Origin: null, as a sandboxed page can:
    # refused unless the admin accepts it
    with _serve(config) as proxy:
        null_refused = httpx.post(f"{proxy.url}/chat/completions", content=chat,
                                  headers={**simple, "Origin": "null"})
    with _serve(config, cors_origins="null") as proxy:
        null_listed = httpx.post(f"{proxy.url}/chat/completions", content=chat,
                                 headers={**simple, "Origin": "null"})
    assert null_refused.status_code == 403 and null_listed.status_code == 200


def test_an_origin_is_matched_as_a_browser_writes_it(tmp_path, upstream):
    """Browsers send an international host in its ASCII form, scheme and host in lower case and
    no default port: `https://例え.jp` as written never matched, and its page was refused."""
    from proxy.settings import Settings

    listed = "https://例え.jp, HTTPS://Chat.Example:443/, http://[::1]:8080, app://Chatbox, *x"
    assert Settings(cors_origins=listed).cors_origin_list() == [
        "https://xn--r8jz45g.jp", "https://chat.example", "http://[::1]:8080", "app://Chatbox", "*x"]
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path)])
    chat = json.dumps({"model": "m1", "messages": MESSAGES})
    preflight = {"Origin": "https://xn--r8jz45g.jp", "Access-Control-Request-Method": "POST"}
    with _serve(config, cors_origins=listed) as proxy:
        pre = httpx.options(f"{proxy.url}/chat/completions", headers=preflight)
        posted = [httpx.post(f"{proxy.url}/chat/completions", content=chat,
                             headers={"Content-Type": "text/plain", "Origin": origin})
                  for origin in ("https://xn--r8jz45g.jp", "https://chat.example")]
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://xn--r8jz45g.jp"
    assert [r.status_code for r in posted] == [200, 200]


def test_ready_answers_what_openapi_json_describes(tmp_path, upstream):
    """Its body grew (cooling_left_s, out_of_quota, the shutting-down reason) while the document
    said only "the body lists the reasons": each field a monitor reads is described, typed."""
    import jsonschema

    upstream.set("m2", rate_limit(30))
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path), _entry("m2", upstream.url, tmp_path),
                                _entry("m3", upstream.url, tmp_path, key="os.environ/SATROUTE_TEST_UNSET_KEY")],
                     num_retries=0, allowed_fails=1)
    with _serve(config) as proxy:
        httpx.post(f"{proxy.url}/chat/completions", json={"model": "m2", "messages": MESSAGES})
        ready = httpx.get(f"{proxy.base}/ready").json()
        doc = httpx.get(f"{proxy.base}/openapi.json").json()
    schema = doc["paths"]["/ready"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ready["cooling_left_s"] and ready["unavailable"]  # the fields are not empty here
    jsonschema.validate(ready, schema)
    assert set(ready) == set(schema["properties"]) == set(schema["required"])


class CrashingDispatcher:
    async def prepare(self, models):
        pass

    async def complete(self, call):
        raise KeyError("a bug in dispatch")


def test_requests_failed_by_a_local_server_going_away_for_a_restart_are_told_to_come_back(tmp_path, upstream):
    """An edit of a local_server block restarts the child under requests queued at it: they fail
    on its connection. With the model now restarting they get the 503 + Retry-After new requests
    get, which the SDK retries, not a 502 it does not."""
    from proxy.errors import AllUpstreamsFailed
    from proxy.localserver import RESTARTING

    class Restarting:
        async def prepare(self, models):
            pass

        async def complete(self, call):
            registry.set_unavailable("m1", f"{RESTARTING}: its configuration changed")
            raise AllUpstreamsFailed("every model failed: m1 (connection)", failed=[("m1", "connection")])

    async def down(call):
        raise AllUpstreamsFailed("every model failed: m2 (connection)", failed=[("m2", "connection")])

    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path), _entry("m2", upstream.url, tmp_path)])
    app = create_app(Settings(config=config, scorer="constant", onboarding=False,
                              state_dir=tmp_path / "state"), dispatcher=Restarting())
    registry = app.state.services.registry
    with ProxyServer(app) as proxy:
        cut = httpx.post(f"{proxy.url}/chat/completions", json={"model": "m1", "messages": MESSAGES})
        registry.set_unavailable("m1", None)
        app.state.services.dispatcher.complete = down  # a model that failed and is not coming back
        failed = httpx.post(f"{proxy.url}/chat/completions", json={"model": "m2", "messages": MESSAGES})
    assert cut.status_code == 503 and cut.headers["retry-after"] == "5"
    assert cut.json()["error"]["code"] == "model_starting"
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "upstream_failed"


def test_an_unhandled_error_is_a_500_with_its_request_id_and_logged_with_its_trace(tmp_path, upstream, caplog):
    """The client can quote the request id of the 500 it got; the log has the trace under it."""
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path)])
    caplog.set_level(logging.INFO)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("satroute.app").addHandler(handler)
    app = create_app(Settings(config=config, scorer="constant", onboarding=False,
                              state_dir=tmp_path / "state"), dispatcher=CrashingDispatcher())
    with ProxyServer(app) as proxy, httpx.Client() as pooled:
        r = pooled.post(f"{proxy.url}/chat/completions", json={"model": "m1", "messages": MESSAGES},
                        headers={"x-request-id": "trace-123"})
        # the same client's next request: the server closed the connection after the crash, and
        # said so, so the pool opens a new one (it met a reset on the old one)
        after = pooled.get(f"{proxy.url}/models", headers={"x-request-id": "trace-456"})
        routed = httpx.post(f"{proxy.url}/chat/completions", json={"model": "auto", "messages": MESSAGES},
                            headers={"x-request-id": "trace-789"})
        deadline = time.monotonic() + 5
        while not (logged := httpx.get(f"{proxy.base}/admin/routes").json()["data"]):
            assert time.monotonic() < deadline, "the routed request that failed is not in the routing log"
            time.sleep(0.1)
    logging.getLogger("satroute.app").removeHandler(handler)
    assert routed.status_code == 500
    assert [(e["request_id"], e["chosen"]) for e in logged] == [("trace-789", None)]
    assert r.status_code == 500 and r.headers["x-request-id"] == "trace-123"
    # the line with the trace, logged outside the request-log layer, names the request too
    crash_lines = [json.loads(line) for line in out.getvalue().splitlines()
                   if '"unhandled error' in line]
    assert [line.get("request_id") for line in crash_lines][:1] == ["trace-123"]
    assert r.json()["error"] == {"message": "internal error in the proxy", "type": "internal_error",
                                 "param": None, "code": None}
    assert after.status_code == 200  # the server goes on
    [line] = [rec.fields for rec in caplog.records if rec.name == "satroute.request"
              and rec.fields["request_id"] == "trace-123"]
    assert line["status"] == 500 and line["error"] == "KeyError"
    crash = [rec for rec in caplog.records if rec.name == "satroute.app" and rec.exc_info]
    assert crash and crash[0].exc_info[0] is KeyError


def test_with_cors_a_browser_can_read_the_500_and_its_request_id(tmp_path, upstream):
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path)])
    origin = "https://chat.example"
    app = create_app(Settings(config=config, scorer="constant", onboarding=False, cors_origins=origin,
                              state_dir=tmp_path / "state"), dispatcher=CrashingDispatcher())
    with ProxyServer(app) as proxy:
        r = httpx.post(f"{proxy.url}/chat/completions", json={"model": "m1", "messages": MESSAGES},
                       headers={"Origin": origin, "x-request-id": "trace-789"})
    assert r.status_code == 500 and r.headers["access-control-allow-origin"] == origin
    assert r.headers["x-request-id"] == "trace-789"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


class UnscoredScorer:
    """Scores m2 only: m1 gets NaN and m3 nothing (a scorer bug, or a model it cannot read)."""

    def score(self, instruction, candidates):
        return {"m1": float("nan"), "m2": 1.0}


def test_an_unscored_candidate_ranks_last_and_every_json_surface_stays_json(tmp_path, upstream, caplog):
    """-inf is how an unscored candidate ranks; JSON has no such number: the preview, the routing
    log and the request's JSON log line show null (a log shipper rejects a line with -Infinity)."""
    config = _config(tmp_path, [_entry(n, upstream.url, tmp_path) for n in ("m1", "m2", "m3")])
    caplog.set_level(logging.INFO, logger="satroute.request")
    with _serve(config, fake=UnscoredScorer()) as proxy:
        chat = {"model": "auto", "messages": MESSAGES}
        preview = httpx.post(f"{proxy.base}/admin/route", json=chat).json()
        raw = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0) \
            .chat.completions.with_raw_response.create(**chat)
        deadline = time.time() + 10
        while not (logged := httpx.get(f"{proxy.base}/admin/routes").json()["data"]) \
                and time.time() < deadline:
            time.sleep(0.1)
    assert preview["ranked"] == [{"model": "m2", "score": 1.0}, {"model": "m1", "score": None},
                                 {"model": "m3", "score": None}]
    assert raw.headers["x-satroute-model"] == "m2"
    # a number JavaScript's parseFloat reads (it read -inf as NaN)
    assert raw.headers["x-satroute-scores"] == "m2=1.0000,m1=-Infinity,m3=-Infinity"
    assert logged[0]["scores"] == {"m2": 1.0, "m1": None, "m3": None}
    routed = [r for r in caplog.records if getattr(r, "fields", {}).get("path") == "/v1/chat/completions"]
    line = JsonFormatter().format(routed[0])
    fields = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in a JSON log line: {line}"))
    assert fields["scores"] == {"m2": 1.0, "m1": None, "m3": None}


def test_auto_goes_to_the_default_model_while_no_model_has_a_profile(tmp_path, upstream,
                                                                      monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    config = _config(tmp_path, [
        _entry("hosted", upstream.url, tmp_path, key="os.environ/NO_SUCH_KEY"),
        _entry("local", upstream.url, tmp_path, profile=False)], default_model="local")
    # the real scorer is never needed here: a scorer that cannot load must not block routing
    with _serve(config, scorer="modelsat", scorer_checkpoint=str(tmp_path / "missing")) as proxy:
        client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        ready = httpx.get(f"{proxy.base}/ready").json()
        models = [m.id for m in client.models.list()]
    assert raw.parse().model == "local"
    assert raw.headers["x-satroute-route"] == "default"
    assert ready["status"] == "ready" and ready["models"] == ["local"]
    assert "NO_SUCH_KEY" in ready["unavailable"]["hosted"]
    assert models == ["auto", "local"]


def test_ready_lists_the_models_of_each_suite_when_profiles_mix_suites(tmp_path, upstream):
    """Profiles of several aptitude suites are not on one scale: routing goes on, and /ready says
    which models were measured on which suite (null once they share one)."""
    models = [_entry("rdc", upstream.url, tmp_path, profile=False),
              _entry("pro", upstream.url, tmp_path, profile=False)]
    models[0]["model_info"]["capability_profile"] = "builtin:routerdc/meta-llama--Meta-Llama-3-8B"
    models[1]["model_info"]["capability_profile"] = "builtin:mmlu_pro/Meta-Llama-3-8B"
    config = _config(tmp_path, models)
    with _serve(config) as proxy:
        ready = httpx.get(f"{proxy.base}/ready")
        client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
        routed = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        models[0]["model_info"]["capability_profile"] = "builtin:mmlu_pro/Mistral-7B-v0.1"
        config = _config(tmp_path, models)
        deadline = time.monotonic() + 5
        while httpx.get(f"{proxy.base}/ready").json()["mixed_suites"] and time.monotonic() < deadline:
            time.sleep(0.05)
        after = httpx.get(f"{proxy.base}/ready").json()
    assert ready.status_code == 200 and ready.json()["mixed_suites"] == {"routerdc": ["rdc"],
                                                                         "mmlu_pro": ["pro"]}
    assert routed.headers["x-satroute-route"] == "routed"
    assert after["mixed_suites"] is None


def test_once_a_model_is_routable_the_default_model_steps_aside(tmp_path, upstream):
    config = _config(tmp_path, [_entry("scored", upstream.url, tmp_path),
                                _entry("local", upstream.url, tmp_path, profile=False)],
                     default_model="local")
    with _serve(config) as proxy:
        client = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "scored" and raw.headers["x-satroute-route"] == "routed"


def test_a_default_model_that_is_not_configured_is_a_config_error(tmp_path, upstream):
    from proxy.errors import ConfigError

    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path)], default_model="nope")
    with pytest.raises(ConfigError, match="default_model"):
        create_app(Settings(config=config, scorer="constant"))


def test_a_local_model_whose_server_cannot_start_is_reported_unavailable(tmp_path, upstream):
    local = {"model_name": "tiny", "litellm_params": {"model": "openai/tiny"},
             "model_info": {"local_server": {"model": "missing.gguf", "port": 8499,
                                             "startup_timeout_s": 20}}}
    config = _config(tmp_path, [_entry("m1", upstream.url, tmp_path), local])
    with _serve(config) as proxy:
        deadline = time.monotonic() + 30
        while True:
            ready = httpx.get(f"{proxy.base}/ready").json()
            reason = ready["unavailable"].get("tiny", "")
            if "starting" not in reason or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        models = httpx.get(f"{proxy.url}/models").json()["data"]
    assert "local server" in reason or "llama-cpp-python" in reason, reason
    assert "tiny" not in [m["id"] for m in models]


async def test_the_scorer_is_loaded_in_the_dtype_the_settings_name(monkeypatch, tmp_path, caplog):
    import scorer as scorer_package
    from proxy.scoring import ScorerHost

    asked = []

    class Loaded:
        runs_on = "cpu, float32"
        checkpoint = {"path": "scorer/checkpoints/default", "weights_sha256": "0123456789abcdef"}

        def score(self, instruction, candidates):
            return dict.fromkeys(candidates, 0.0)

    def fake_load(checkpoint=None, device=None, dtype=None):
        asked.append((checkpoint, device, dtype))
        return Loaded()

    monkeypatch.setattr(scorer_package, "load_scorer", fake_load)
    monkeypatch.setenv("SATROUTE_SCORER_DTYPE", "float32")
    caplog.set_level(logging.INFO, logger="satroute.scoring")
    host = ScorerHost()
    assert host.describe() == {"state": "loading"}
    try:
        await host.load(Settings(config=tmp_path / "providers.yaml", scorer="modelsat", scorer_device="cpu"))
    finally:
        host.close()
    assert asked == [(None, "cpu", "float32")] and host.ready
    assert host.describe() == {"state": "loaded", "runs_on": "cpu, float32",  # as /ready reports it
                               "checkpoint": Loaded.checkpoint}
    # the log says where the scorer runs and which weights it holds
    assert "(cpu, float32; checkpoint scorer/checkpoints/default, weights 0123456789abcdef; " in caplog.text
    monkeypatch.delenv("SATROUTE_SCORER_DTYPE")
    assert Settings(config=tmp_path / "p.yaml").scorer_dtype == "auto"
    monkeypatch.setenv("SATROUTE_SCORER_DTYPE", "float16")
    with pytest.raises(ValueError, match="scorer_dtype"):
        Settings(config=tmp_path / "p.yaml")


def test_the_scorer_leaves_a_busy_local_server_its_cores_and_freezes_what_start_up_built(
        monkeypatch, tmp_path):
    """torch used every core: with a local model generating beside it, a scoring call took 2 to 4
    times longer (both spin on a busy CPU) and routed requests timed out to the aptitude ranking.
    A call now takes the cores the local servers answering at that moment leave (an idle one takes
    none), or those other processes left over the last second (proxy/cpuload.py), whichever is
    fewer; SATROUTE_SCORER_TORCH_THREADS fixes the number. Once loaded, start-up's objects are
    frozen out of the garbage collector's walks: a full collection over them held the event loop
    for ~350 ms."""
    import asyncio
    import gc
    import os

    import torch

    import proxy.app
    import scorer as scorer_package

    class Loaded:  # says how many threads torch has on the thread that scores
        def score(self, instruction, candidates):
            return dict.fromkeys(candidates, float(torch.get_num_threads()))

    monkeypatch.setattr(scorer_package, "load_scorer", lambda *a, **kw: Loaded())
    config = _config(tmp_path, [
        {"model_name": "local", "litellm_params": {"model": "openai/local"},
         "model_info": {"local_server": {"model": str(tmp_path / "missing.gguf"), "threads": 1}}},
        _entry("m1", "http://127.0.0.1:9/v1", tmp_path)])
    cores = len(os.sched_getaffinity(0))  # the cores the proxy may run on, not the host's
    others = {"cores": 0}  # what the load of other processes says, set by the test

    class OtherLoad:
        def busy_cores(self):
            return others["cores"]

        async def watch(self, interval_s):
            await asyncio.Event().wait()

    monkeypatch.setattr(proxy.app, "CpuLoad", OtherLoad)

    def preview(n):  # a new text each time: scores remembered for a text are not scored again
        return {"model": "auto", "messages": [{"role": "user", "content": f"Question {n}?"}]}
    gc.unfreeze()

    def threads_used(**settings) -> list[float]:
        app = create_app(Settings(config=config, scorer="modelsat", scorer_device="cpu",
                                  reload_interval_s=0.1, onboarding=False,
                                  state_dir=tmp_path / "state", **settings))
        with ProxyServer(app) as proxy:
            wait = time.monotonic() + 30
            while httpx.get(f"{proxy.base}/ready").json()["scorer"]["state"] != "loaded":
                assert time.monotonic() < wait, "the scorer never loaded"
                time.sleep(0.05)
            def score(n):
                return httpx.post(f"{proxy.base}/admin/route", json=preview(n)).json()["ranked"][0]["score"]

            used = [score(1)]
            app.state.services.dispatcher._busy["local"] += 1  # the local model is answering a call
            used.append(score(2))
            app.state.services.dispatcher._busy["local"] -= 1
            used.append(score(3))
            others["cores"] = 1  # another process (a server beside the proxy) keeps a core busy
            used.append(score(4))
            others["cores"] = 0
        return used

    try:
        assert threads_used() == [cores, max(1, cores - 1), cores, max(1, cores - 1)]
        assert gc.get_freeze_count() > 0
        assert threads_used(scorer_torch_threads=3) == [3, 3, 3, 3]
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("error", [TypeError("unexpected keyword argument 'enable_gqa'"),
                                   AssertionError("Torch not compiled with CUDA enabled")])
async def test_a_scorer_that_fails_to_load_in_any_way_is_reported_not_loading_for_ever(monkeypatch, tmp_path, error):
    import scorer as scorer_package
    from proxy.scoring import ScorerHost

    def fake_load(checkpoint=None, device=None, dtype=None):
        raise error

    monkeypatch.setattr(scorer_package, "load_scorer", fake_load)
    host = ScorerHost()
    try:
        await host.load(Settings(config=tmp_path / "providers.yaml", scorer="modelsat"))
    finally:
        host.close()
    assert not host.ready and host.error == f"{type(error).__name__}: {error}"
    assert host.describe()["state"] != "loading"


async def test_a_scorer_that_failed_to_load_is_loaded_again_once_the_fault_passes(monkeypatch, tmp_path):
    """A failure that passes (another replica's conversion on a shared volume, a volume mounted
    late) left the proxy not ready for good, and /health answering, so nothing restarted it."""
    import scorer as scorer_package
    from proxy.scoring import ConstantScorer, ScorerHost

    tries = []

    def fake_load(checkpoint=None, device=None, dtype=None):
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise OSError("No such file or directory: 'model.safetensors'")
        return ConstantScorer()

    monkeypatch.setattr(scorer_package, "load_scorer", fake_load)
    host = ScorerHost()
    try:
        await asyncio.wait_for(host.keep_loading(Settings(config=tmp_path / "providers.yaml", scorer="modelsat"),
                                                 first_wait_s=0.05, max_wait_s=0.1), 10)
    finally:
        host.close()
    assert host.ready and host.error is None and len(tries) == 3
    assert tries[2] - tries[1] >= 0.09  # the wait doubled


async def test_ready_says_why_the_scorer_runs_on_the_cpu_of_a_machine_with_cuda(monkeypatch, tmp_path):
    import scorer as scorer_package
    from proxy.scoring import ScorerHost

    class FellBack:
        runs_on = "cpu, bfloat16"
        cuda_error = "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"

        def score(self, instruction, candidates):
            return dict.fromkeys(candidates, 0.0)

    monkeypatch.setattr(scorer_package, "load_scorer", lambda checkpoint=None, device=None, dtype=None: FellBack())
    host = ScorerHost()
    try:
        await host.load(Settings(config=tmp_path / "providers.yaml", scorer="modelsat"))
    finally:
        host.close()
    assert host.describe() == {"state": "loaded", "runs_on": "cpu, bfloat16", "cuda_error": FellBack.cuda_error}


async def test_the_scorer_is_warmed_up_on_the_routable_profiles_before_it_takes_requests(monkeypatch, tmp_path, caplog):
    import asyncio

    import scorer as scorer_package
    from proxy.scoring import ScorerHost

    calls = []

    class Loaded:
        runs_on = "cpu, float32"
        fail = False

        def warm_up(self, profiles=None):
            calls.append((sorted(profiles or {}), host.ready))
            if self.fail:
                raise RuntimeError("out of memory")

        def score(self, instruction, candidates):
            return dict.fromkeys(candidates, 0.0)

    loaded = Loaded()
    monkeypatch.setattr(scorer_package, "load_scorer", lambda *a, **k: loaded)
    caplog.set_level(logging.INFO, logger="satroute.scoring")
    routable = {"m1": {"law": 0.5}}
    host = ScorerHost()
    try:
        await host.load(Settings(config=tmp_path / "providers.yaml", scorer="modelsat"), lambda: dict(routable))
        assert calls == [(["m1"], False)] and host.ready  # warmed before it was marked ready
        assert "scorer warmed up" in caplog.text
        watcher = asyncio.create_task(host.keep_warm(lambda: dict(routable), 0.01))
        await asyncio.sleep(0.05)
        assert calls == [(["m1"], False)]  # nothing new: nothing encoded again
        routable["m2"] = {"law": 0.9}  # onboarded, or added by a reload
        routable["m1-copy"] = {"law": 0.5}  # the same profile under another name is already encoded
        await asyncio.sleep(0.05)
        assert calls == [(["m1"], False), (["m2"], True)]
        loaded.fail = True
        routable["m3"] = {"law": 0.1}
        await asyncio.sleep(0.05)
        assert "scorer warm-up failed: RuntimeError: out of memory" in caplog.text and host.ready
        assert calls[2:] == [(["m3"], True)]  # tried once, not at every tick
        loaded.fail = False
        for version in range(50):  # a profile re-measured (or a model renamed) again and again
            routable["m3"] = {"law": version / 100}
            await asyncio.sleep(0.02)
        assert len(host._warm) == len({str(p) for p in routable.values()})  # only what is routable now
        watcher.cancel()
    finally:
        host.close()


async def test_the_scores_of_a_request_scored_again_are_remembered_not_recomputed():
    """A retry or a "regenerate" sends the same instruction to the same candidates: the scorer is
    deterministic, so its earlier scores answer at once. Anything that could change them (the
    text, a candidate, a profile) is another request; a failure is never remembered."""
    from proxy.scoring import ScorerDegraded, ScorerHost

    calls = []

    class Counting:
        fail = False

        def score(self, instruction, candidates):
            calls.append(instruction)
            if self.fail:
                raise RuntimeError("CUDA out of memory")
            return {n: len(instruction) + sum(p.values()) for n, p in candidates.items()}

    host = ScorerHost(Counting(), remember=2)
    cands = {"a": {"law": 0.5}, "b": {"law": 0.7}}
    try:
        first = await host.score("law court", cands, timeout_s=1.0)
        again = await host.score("law court", dict(reversed(cands.items())), timeout_s=1.0)
        assert calls == ["law court"] and not first.remembered and again.remembered
        assert again.scores == first.scores and again.ms < first.ms
        again.scores["a"] = -1.0  # a caller's change to its copy does not reach the next request
        assert (await host.score("law court", cands)).scores == first.scores
        await host.score("law court?", cands)  # another instruction
        await host.score("law court", {**cands, "b": {"law": 0.8}})  # a profile changed (onboarding)
        await host.score("law court", {"a": {"law": 0.5}})  # another set of candidates
        assert calls == ["law court", "law court?", "law court", "law court"]
        assert (await host.score("law court", cands)).remembered is False  # only the 2 newest are kept
        host.scorer.fail = True
        for _ in range(2):
            with pytest.raises(ScorerDegraded):
                await host.score("new text", cands)
        assert calls[-2:] == ["new text", "new text"]  # the failure was not remembered
    finally:
        host.close()
    forgetful = ScorerHost(Counting(), remember=0)
    try:
        await forgetful.score("law court", cands)
        assert (await forgetful.score("law court", cands)).remembered is False
    finally:
        forgetful.close()


async def test_twin_requests_in_flight_share_one_scoring_call_even_after_one_gives_up(caplog):
    """A request that arrives while its twin (same instruction, same candidates) is being scored
    waits for that call; the call outlives a request that stopped waiting, and its scores answer
    the retry. A failure reaches every waiter and is not kept: the next twin is scored afresh."""
    import asyncio
    import gc

    from proxy.scoring import ScorerDegraded, ScorerHost

    calls = []

    class Slow:
        fail = False

        def score(self, instruction, candidates):
            calls.append(instruction)
            time.sleep(0.2)
            if self.fail:
                raise RuntimeError("CUDA out of memory")
            return dict.fromkeys(candidates, float(len(instruction)))

    host = ScorerHost(Slow())
    cands = {"a": {"law": 0.5}, "b": {"law": 0.7}}
    try:
        first, twin = await asyncio.gather(host.score("law court", cands, timeout_s=2.0),
                                           host.score("law court", cands, timeout_s=2.0))
        assert calls == ["law court"] and first.scores == twin.scores == {"a": 9.0, "b": 9.0}
        assert (first.remembered, twin.remembered) == (False, True)

        host._typical_s = 0.0  # below: calls that start in time, not skipped as hopeless
        impatient = asyncio.ensure_future(host.score("war", cands, timeout_s=0.05))
        await asyncio.sleep(0.01)
        patient = await host.score("war", cands, timeout_s=2.0)  # joins the running call
        with pytest.raises(ScorerDegraded):
            await impatient  # gave up at 0.05 s without cancelling the call
        assert patient.remembered and patient.scores == {"a": 3.0, "b": 3.0}
        host._typical_s = 0.0
        with pytest.raises(ScorerDegraded):
            await host.score("cells", cands, timeout_s=0.05)  # alone, and gives up
        await _settled(host)
        retry = await host.score("cells", cands, timeout_s=0.05)  # the call finished meanwhile
        assert retry.remembered and retry.scores == {"a": 5.0, "b": 5.0}
        assert calls == ["law court", "war", "cells"]

        host.scorer.fail = True
        caplog.set_level(logging.ERROR)
        failures = await asyncio.gather(*(host.score("atoms", cands, timeout_s=2.0) for _ in range(2)),
                                        return_exceptions=True)
        assert [type(f).__name__ for f in failures] == ["ScorerDegraded"] * 2
        assert all(f.reason == "scorer_failed" for f in failures) and calls[3:] == ["atoms"]
        host._typical_s = 0.0
        with pytest.raises(ScorerDegraded):
            await host.score("energy", cands, timeout_s=0.05)  # nobody waits for this failure
        await _settled(host)
        gc.collect()
        assert "never retrieved" not in caplog.text
        host.scorer.fail = False
        assert not (await host.score("atoms", cands, timeout_s=2.0)).remembered  # scored afresh
        assert calls[-1] == "atoms" and not host._calls
    finally:
        host.close()


async def _settled(host, within_s: float = 5.0) -> None:
    """Until no scoring call of ``host`` is running or queued (a test's wait, bounded)."""
    import asyncio

    deadline = time.perf_counter() + within_s
    while (host._calls or host._busy_since) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)


class _Hangs:
    """Every candidate scores 1.0; the instruction "hang" blocks its thread until ``release``."""

    def __init__(self, release):
        self.release = release

    def score(self, instruction, candidates):
        if instruction == "hang":
            self.release.wait(5)
        return dict.fromkeys(candidates, 1.0)


async def test_a_twin_with_time_left_is_scored_when_the_call_it_joined_is_skipped_as_hopeless():
    """The first request's deadline made the shared call hopeless by the time its turn came; the
    twin that joined it later still has time, so it gets a call of its own, not the means."""
    import asyncio
    import threading

    from proxy.scoring import ScorerHost

    release, calls = threading.Event(), []

    class Counting(_Hangs):
        def score(self, instruction, candidates):
            calls.append(instruction)
            return super().score(instruction, candidates)

    host = ScorerHost(Counting(release))
    cands = {"a": {"law": 0.5}}
    try:
        busy = asyncio.ensure_future(host.score("hang", cands, timeout_s=5.0))  # holds the thread
        first = asyncio.ensure_future(host.score("law court", cands, timeout_s=0.1))  # queued behind it
        await asyncio.sleep(0.02)
        twin = asyncio.ensure_future(host.score("law court", cands, timeout_s=2.0))  # joins the first's call
        asyncio.get_running_loop().call_later(0.3, release.set)  # the thread frees after the first gave up
        scored = await twin
        assert scored.scores == {"a": 1.0} and not scored.remembered  # scored by a call of its own
        assert (await asyncio.gather(first, return_exceptions=True))[0].reason == "scorer_timeout"
        assert calls == ["hang", "law court"]  # the hopeless call was skipped, the twin's ran
        await busy
    finally:
        release.set()
        host.close()


async def test_a_stalled_scorer_is_not_waited_for_and_is_reported_until_its_call_returns(caplog):
    """A hung device or a deadlock: the one scorer thread never comes back. Past the stall limit
    requests stop queueing behind it (each would wait its whole timeout) and are ranked by the
    means at once; /ready's scorer says "stalled". When the call returns, scoring resumes."""
    import asyncio
    import threading

    from proxy.scoring import ScorerDegraded, ScorerHost

    release = threading.Event()
    host = ScorerHost(_Hangs(release), stall_after_s=0.5)
    cands = {"a": {"law": 0.5}}
    try:
        with pytest.raises(ScorerDegraded) as err:
            await host.score("hang", cands, timeout_s=0.03)
        assert err.value.reason == "scorer_timeout" and host.describe()["state"] == "loaded"
        await asyncio.sleep(0.05)  # running about 0.08 s: slow, not stalled yet
        with pytest.raises(ScorerDegraded) as err:
            await host.score("next", cands, timeout_s=0.03)
        assert err.value.reason == "scorer_timeout"  # still waited its timeout in the queue
        await asyncio.sleep(0.5)
        caplog.set_level(logging.ERROR, logger="satroute.scoring")
        started = time.perf_counter()
        for _ in range(3):
            with pytest.raises(ScorerDegraded) as err:
                await host.score("another", cands, timeout_s=0.1)  # 5 timeouts = the 0.5 s limit
            assert err.value.reason == "scorer_stalled"
        assert time.perf_counter() - started < 0.15  # not one of them waited (each would: 0.1 s)
        assert caplog.text.count("a scoring call has run for") == 1  # reported once, not per request
        state = host.describe()
        assert state["state"] == "stalled" and state["busy_s"] >= 0.5
        release.set()
        await _settled(host)
        assert host.describe()["state"] == "loaded"
        assert (await host.score("after", cands, timeout_s=1.0)).scores == {"a": 1.0}
    finally:
        release.set()
        host.close()


async def test_one_stuck_thread_of_two_is_not_a_stall():
    import asyncio
    import threading

    from proxy.scoring import ScorerHost

    release = threading.Event()
    host = ScorerHost(_Hangs(release), threads=2, stall_after_s=0.05)
    try:
        stuck = asyncio.ensure_future(host.score("hang", {"a": {}}, timeout_s=2.0))
        await asyncio.sleep(0.1)
        assert host.stalled_for() is None  # the other thread still scores
        assert (await host.score("free", {"a": {}}, timeout_s=1.0)).scores == {"a": 1.0}
        release.set()
        await stuck
    finally:
        release.set()
        host.close()


async def test_a_queued_scoring_call_that_cannot_end_in_time_is_skipped_not_run():
    """Under overload the oldest queued calls are about to give up: the scorer skips them rather
    than spend itself on answers nobody waits for, and their requests are ranked by the means."""
    import asyncio

    from proxy.scoring import ScorerDegraded, ScorerHost, _TooLate

    ran = []

    class Slow:
        def score(self, instruction, candidates):
            ran.append(instruction)
            time.sleep(0.05)
            return dict.fromkeys(candidates, 1.0)

    host = ScorerHost(Slow())
    try:
        host._typical_s = 0.2  # recent calls took 0.2 s
        with pytest.raises(_TooLate):
            host._run(host.scorer, "late", {"m": {}}, time.perf_counter() + 0.1)
        assert ran == []  # skipped: the scorer never ran it
        assert host._run(host.scorer, "in time", {"m": {}}, time.perf_counter() + 1.0) == {"m": 1.0}
        assert ran == ["in time"] and 0.05 < host._typical_s < 0.2  # the pace follows the calls
        host._typical_s = 5.0  # a slow spell: at this pace no call ends within 1 s
        # behind a call that holds the only thread, a queued call that cannot end in time is skipped
        holder = asyncio.ensure_future(host.score("holds the thread", {"m": {}}))
        await asyncio.sleep(0)
        started = time.perf_counter()
        with pytest.raises(ScorerDegraded) as err:
            await host.score("hopeless", {"m": {}}, timeout_s=1.0)
        assert err.value.reason == "scorer_timeout" and time.perf_counter() - started < 0.5  # at once
        await holder
        assert "hopeless" not in ran
        # but a call that finds the thread free runs, whatever the pace says: it is how the pace
        # is measured again, or one slow spell would leave the scorer unused until a restart
        host._typical_s = 5.0
        scored = await host.score("free thread", {"m": {}}, timeout_s=1.0)
        assert scored.scores == {"m": 1.0} and host._typical_s < 5.0
        scored = await host.score("no deadline", {"m": {}})  # no timeout: never skipped
        assert scored.scores == {"m": 1.0} and scored.ms >= 50 and not scored.remembered
    finally:
        host.close()


async def test_the_scorer_is_used_again_after_a_slow_spell():
    """Calls slower than the timeout for a while, then fast again: requests are scored again."""
    from proxy.scoring import ScorerDegraded, ScorerHost

    pace = {"s": 0.3}

    class Moody:
        calls = 0

        def score(self, instruction, candidates):
            Moody.calls += 1
            time.sleep(pace["s"])
            return dict.fromkeys(candidates, 1.0)

    host = ScorerHost(Moody(), stall_after_s=60)
    try:
        for i in range(6):  # each call takes 0.3 s against a 0.2 s timeout
            with pytest.raises(ScorerDegraded):
                await host.score(f"slow {i}", {"m": {}}, timeout_s=0.2)
            await _settled(host)
        assert host._typical_s > 0.2
        pace["s"] = 0.005
        before = Moody.calls
        for i in range(5):
            assert (await host.score(f"fast {i}", {"m": {}}, timeout_s=0.2)).scores == {"m": 1.0}
        assert Moody.calls - before == 5
    finally:
        host.close()


@pytest.mark.parametrize("error", [IndexError("index out of range in self"), AttributeError("x"), OSError("io")])
async def test_any_scorer_error_ranks_the_request_by_the_profiles_instead_of_failing_it(error):
    from proxy.scoring import ScorerDegraded, ScorerHost

    class Broken:
        def score(self, instruction, candidates):
            raise error

    host = ScorerHost(Broken())
    try:
        for _ in range(2):  # and never remembered: the second request calls the scorer again
            with pytest.raises(ScorerDegraded) as err:
                await host.score("law court", {"m": {}}, timeout_s=1.0)
            assert err.value.reason == "scorer_failed"
    finally:
        host.close()


async def test_a_warm_up_that_hangs_is_a_stall_like_a_scoring_call_that_does():
    import asyncio
    import threading

    from proxy.scoring import ScorerDegraded, ScorerHost

    release = threading.Event()

    class HangsInWarmUp:
        def warm_up(self, profiles=None):
            release.wait(10)  # the device hangs on a newly routable profile

        def score(self, instruction, candidates):
            return dict.fromkeys(candidates, 1.0)

    host = ScorerHost(HangsInWarmUp(), stall_after_s=0.3)
    watcher = asyncio.ensure_future(host.keep_warm(lambda: {"m": {"law": 0.5}}, 0.01))
    try:
        await asyncio.sleep(0.5)
        assert host.describe()["state"] == "stalled"
        started = time.perf_counter()
        with pytest.raises(ScorerDegraded) as err:
            await host.score("law court", {"m": {"law": 0.5}}, timeout_s=0.05)
        assert err.value.reason == "scorer_stalled" and time.perf_counter() - started < 0.03
        release.set()
        await _settled(host)
        assert (await host.score("law court", {"m": {"law": 0.5}}, timeout_s=1.0)).scores == {"m": 1.0}
    finally:
        watcher.cancel()
        release.set()
        host.close()


async def test_a_stall_that_ends_in_an_error_is_reported_again_next_time(caplog):
    import asyncio
    import threading

    from proxy.scoring import ScorerDegraded, ScorerHost

    release = threading.Event()

    class HangsThenFails:
        def score(self, instruction, candidates):
            if instruction.startswith("hang"):
                release.wait(10)
                release.clear()
                raise RuntimeError("device lost")
            return dict.fromkeys(candidates, 1.0)

    caplog.set_level(logging.WARNING, logger="satroute.scoring")
    host = ScorerHost(HangsThenFails(), stall_after_s=0.2)
    try:
        for round_ in range(2):
            hung = asyncio.ensure_future(host.score(f"hang {round_}", {"m": {}}, timeout_s=0.04))
            await asyncio.sleep(0.3)
            with pytest.raises(ScorerDegraded) as err:
                await host.score("law court", {"m": {}}, timeout_s=0.04)
            assert err.value.reason == "scorer_stalled"
            release.set()
            await asyncio.gather(hung, return_exceptions=True)
            await _settled(host)
        assert caplog.text.count("a scoring call has run for") == 2  # each stall is reported
        assert caplog.text.count("scoring again") == 2  # and so is each end
    finally:
        release.set()
        host.close()


def test_a_profile_the_scorer_cannot_read_stays_last_when_the_scorer_fails(tmp_path, upstream):
    """Ranked by the profiles' means (the scorer failed), a hand-written profile with the highest
    mean must not win: the scorer cannot read it, so it is last, as when the scorer ranks."""
    class FailingReader:
        def read_profile(self, name, profile):
            if name == "custom":
                raise ValueError("candidate 'custom': its profile has no task of suite 'mmlu_pro'")
            return profile

        def score(self, instruction, candidates):
            raise RuntimeError("device lost")

    entries = [_entry(n, upstream.url, tmp_path) for n in ("m1", "custom")]
    (tmp_path / "custom.json").write_text('{"model": "custom", "tasks": {"my_task": 0.95}}')
    with _serve(_config(tmp_path, entries), fake=FailingReader()) as proxy:
        raw = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0) \
            .chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-satroute-degraded"] == "scorer_failed"
    assert raw.headers["x-satroute-model"] == "m1"
    assert raw.headers["x-satroute-scores"] == "m1=0.5000,custom=-Infinity"


async def test_a_profile_the_scorer_cannot_read_ranks_its_model_last_not_every_request_degraded(caplog):
    """A hand-written profile with no task of the scorer's suite: the Model-SAT scorer refuses it
    (ValueError naming it). The others are still scored by the network, that model comes last, and
    the log says so once."""
    from proxy.scoring import ScorerHost

    class Reading:
        def read_profile(self, name, profile):
            if "law" not in profile:
                raise ValueError(f"candidate {name!r}: its profile has no task of suite 'mmlu_pro'")
            return profile

        def score(self, instruction, candidates):
            for name, profile in candidates.items():
                self.read_profile(name, profile)
            return {n: p["law"] for n, p in candidates.items()}

    host = ScorerHost(Reading())
    cands = {"a": {"law": 0.5}, "custom": {"my_task": 0.9}, "b": {"law": 0.7}}
    warmed = []
    Reading.warm_up = lambda self, profiles: warmed.append(self.score("warm", profiles))
    await host._warm_up(host.scorer, cands)  # the readable ones are warmed; no failure
    assert warmed == [{"a": 0.5, "b": 0.7}] and "warm-up failed" not in caplog.text
    try:
        for _ in range(2):
            scored = await host.score("law court", cands, timeout_s=1.0)
            assert scored.scores == {"a": 0.5, "b": 0.7, "custom": float("-inf")}
        only = await host.score("law court", {"custom": {"my_task": 0.9}}, timeout_s=1.0)
        assert only.scores == {"custom": float("-inf")}
        # and when the scorer fails or times out, the profiles' means rank it last all the same
        assert host.ranked_without_scorer(cands) == {"a": 0.5, "b": 0.7, "custom": float("-inf")}
    finally:
        host.close()
    assert caplog.text.count("cannot read the profile of custom") == 1


async def test_a_warm_up_of_many_profiles_lets_requests_be_scored_between_its_parts(tmp_path, monkeypatch):
    """60 profiles of a reload were encoded in one 7 s call, and the requests queued behind it
    waited out the scorer's timeout: they are encoded a few at a time, requests in between."""
    import scorer as scorer_package
    from proxy.scoring import WARM_UP_CHUNK, ScorerHost

    events = []

    class Loaded:
        runs_on = "cpu, float32"

        def warm_up(self, profiles=None):
            time.sleep(0.1)
            events.append(("warm", len(profiles or {})))

        def score(self, instruction, candidates):
            events.append(("score", len(candidates)))
            return dict.fromkeys(candidates, 0.0)

    monkeypatch.setattr(scorer_package, "load_scorer", lambda *a, **k: Loaded())
    host = ScorerHost()
    try:
        await host.load(Settings(config=tmp_path / "providers.yaml", scorer="modelsat"), lambda: {})
        events.clear()
        many = {f"m{i}": {"law": i / 100} for i in range(3 * WARM_UP_CHUNK)}
        warming = asyncio.create_task(host._warm_up(host.scorer, many))
        await asyncio.sleep(0.05)
        await host.score("hello", {"m0": many["m0"]}, 5.0)
        await warming
    finally:
        host.close()
    assert events == [("warm", WARM_UP_CHUNK), ("score", 1), ("warm", WARM_UP_CHUNK), ("warm", WARM_UP_CHUNK)]
