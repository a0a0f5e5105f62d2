"""The routing log: routed requests written in batches off the request path; GET /admin/routes."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import RecordingScorer, model_entry, write_config
from proxy.routelog import RouteLog
from proxy.store import DB_NAME, RouteEntry, Store
from support.mock_upstream import fail

MESSAGES = [{"role": "user", "content": "hello"}]
FLUSH_S = 0.05
KEY = "sk-admin-test-12345678"


def client(proxy, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url, api_key=key, max_retries=0, timeout=30)


def state_of(tmp_path: Path) -> Path:
    """The state directory start_proxy uses, with a store in it (so the proxy opens it)."""
    Store(tmp_path / "state").close()
    return tmp_path / "state"


def serve(tmp_path, upstream, start_proxy, scores=None, **settings):
    models = [model_entry(n, upstream.url, tmp_path) for n in ("m1", "m2", "m3")]
    config = write_config(tmp_path / "providers.yaml", models)
    state_of(tmp_path)
    settings = {"route_log_flush_s": FLUSH_S, **settings}
    return start_proxy(config, scorer=RecordingScorer(scores or {"m2": 0.9, "m1": 0.2}),
                       **settings)


def routes(proxy, limit: int | None = None, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    params = {} if limit is None else {"limit": limit}
    return httpx.get(f"{proxy.base}/admin/routes", params=params, headers=headers, timeout=10)


def wait_for_routes(proxy, n: int, key: str | None = None, within_s: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + within_s
    while True:
        data = routes(proxy, key=key).json()["data"]
        if len(data) >= n or time.monotonic() > deadline:
            assert len(data) >= n, f"{len(data)} routing-log entries after {within_s}s: {data}"
            return data
        time.sleep(FLUSH_S / 2)


def test_routed_request_appears_with_answering_model_scores_and_request_id(
        tmp_path, upstream, start_proxy):
    proxy = serve(tmp_path, upstream, start_proxy)
    started = time.time()
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="auto", messages=MESSAGES, extra_headers={"X-Request-ID": "req-route-log-1"})
    assert raw.parse().model == "m2"
    list(client(proxy).chat.completions.create(model="auto", messages=MESSAGES, stream=True))
    newest, first = wait_for_routes(proxy, 2)
    assert first["request_id"] == "req-route-log-1" == raw.headers["x-request-id"]
    assert newest["request_id"].startswith("req_") and newest["request_id"] != "req-route-log-1"
    for entry in (first, newest):
        assert (entry["requested"], entry["chosen"], entry["failed"]) == ("auto", "m2", [])
        assert entry["scores"] == {"m2": 0.9, "m1": 0.2, "m3": 0.0}
        assert list(entry["scores"]) == ["m2", "m1", "m3"]  # best first, as ranked
        assert isinstance(entry["scorer_ms"], float) and entry["scorer_ms"] >= 0
        assert started - 1 <= entry["at"] <= time.time()
    assert first["at"] <= newest["at"]
    assert sorted(first) == ["at", "chosen", "degraded", "failed", "request_id", "requested", "scorer_ms",
                             "scores"]
    assert first["degraded"] is None  # the scorer ranked it
    assert routes(proxy).json()["object"] == "list"


def test_fallback_records_the_models_that_failed(tmp_path, upstream, start_proxy):
    proxy = serve(tmp_path, upstream, start_proxy, scores={"m1": 0.9, "m2": 0.5, "m3": 0.1})
    upstream.set("m1", fail(500))
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "m2"
    (entry,) = wait_for_routes(proxy, 1)
    assert entry["chosen"] == "m2"
    assert entry["failed"] == [{"model": "m1", "reason": "http_500"}]
    assert entry["scores"]["m1"] == 0.9  # the scores of the decision, not of the answer


def test_default_model_answer_is_logged_without_scores(tmp_path, upstream, start_proxy):
    config = write_config(tmp_path / "providers.yaml",
                          [model_entry("m1", upstream.url, tmp_path, profile=False)],
                          default_model="m1")
    state_of(tmp_path)
    proxy = start_proxy(config, route_log_flush_s=FLUSH_S)
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-satroute-route"] == "default"
    (entry,) = wait_for_routes(proxy, 1)
    assert (entry["requested"], entry["chosen"]) == ("auto", "m1")
    assert entry["scores"] is None and entry["scorer_ms"] is None and entry["failed"] == []


def test_direct_requests_are_not_logged(tmp_path, upstream, start_proxy):
    proxy = serve(tmp_path, upstream, start_proxy)
    c = client(proxy)
    assert c.chat.completions.create(model="m1", messages=MESSAGES).model == "m1"
    assert c.chat.completions.create(model="m3", messages=MESSAGES).model == "m3"
    c.chat.completions.create(model="auto", messages=MESSAGES)
    # Entries are written in arrival order; once the routed one is there, the direct ones would be.
    assert [e["chosen"] for e in wait_for_routes(proxy, 1)] == ["m2"]


def test_master_key_guards_the_routing_log(tmp_path, upstream, start_proxy):
    proxy = serve(tmp_path, upstream, start_proxy, master_key=KEY)
    assert routes(proxy).status_code == 401
    wrong = routes(proxy, key="sk-wrong-key-123456")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    client(proxy, KEY).chat.completions.create(model="auto", messages=MESSAGES)
    assert wait_for_routes(proxy, 1, key=KEY)[0]["chosen"] == "m2"


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "abc", "", "1.5", "9" * 5000])
def test_bad_limit_is_400_in_openai_shape(tmp_path, upstream, start_proxy, limit):
    proxy = serve(tmp_path, upstream, start_proxy)
    resp = httpx.get(f"{proxy.base}/admin/routes?limit={limit}", timeout=10)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", "limit", "invalid_value")


def test_limit_returns_the_newest_entries(tmp_path, upstream, start_proxy):
    proxy = serve(tmp_path, upstream, start_proxy)
    c = client(proxy)
    for n in range(3):
        c.chat.completions.create(model="auto", messages=MESSAGES,
                                  extra_headers={"X-Request-ID": f"req-{n}"})
    wait_for_routes(proxy, 3)
    assert [e["request_id"] for e in routes(proxy, limit=2).json()["data"]] == ["req-2", "req-1"]
    assert len(routes(proxy, limit=1000).json()["data"]) == 3


def test_entries_pending_at_shutdown_are_written(tmp_path, upstream, start_proxy):
    proxy = serve(tmp_path, upstream, start_proxy, route_log_flush_s=3600)
    c = client(proxy)
    for n in range(3):
        c.chat.completions.create(model="auto", messages=MESSAGES,
                                  extra_headers={"X-Request-ID": f"req-{n}"})
    with Store(tmp_path / "state") as reader:  # a second connection: nothing written yet
        assert reader.recent_routes() == []
    proxy.stop()
    with Store(tmp_path / "state") as store:
        rows = store.recent_routes()
    assert [r["request_id"] for r in rows] == ["req-2", "req-1", "req-0"]
    assert {r["chosen"] for r in rows} == {"m2"}


def test_route_log_off_writes_nothing(tmp_path, upstream, start_proxy):
    proxy = serve(tmp_path, upstream, start_proxy, route_log=False)
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "m2"
    time.sleep(4 * FLUSH_S)  # several flush intervals: absence can only be checked after a while
    assert routes(proxy).json() == {"object": "list", "data": []}
    proxy.stop()
    with Store(tmp_path / "state") as store:
        assert store.recent_routes() == []


def test_onboarding_off_still_opens_the_store_for_the_log(tmp_path, upstream, start_proxy):
    config = write_config(tmp_path / "providers.yaml",
                          [model_entry(n, upstream.url, tmp_path) for n in ("m1", "m2")])
    proxy = start_proxy(config, route_log_flush_s=FLUSH_S)  # onboarding off, no satroute.db yet
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "m1"
    assert wait_for_routes(proxy, 1)[0]["chosen"] == "m1"
    proxy.stop()
    assert (tmp_path / "state" / DB_NAME).exists()


def test_without_a_store_there_is_no_log_and_requests_still_work(tmp_path, upstream, start_proxy):
    config = write_config(tmp_path / "providers.yaml",
                          [model_entry(n, upstream.url, tmp_path) for n in ("m1", "m2")])
    # onboarding and the routing log off, no satroute.db: nothing opens the store
    proxy = start_proxy(config, route_log=False, route_log_flush_s=FLUSH_S)
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "m1"
    assert routes(proxy).json() == {"object": "list", "data": []}
    proxy.stop()
    assert not (tmp_path / "state" / DB_NAME).exists()


def test_full_buffer_drops_the_oldest_and_counts_them(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="satroute.routelog")
    with Store(tmp_path) as store:
        route_log = RouteLog(store, flush_s=3600, max_pending=3)
        for n in range(5):
            route_log.record("auto", f"m{n}", scores={f"m{n}": 1.0}, scorer_ms=1.0)
        assert (route_log.pending, route_log.dropped) == (3, 2)
        assert asyncio.run(route_log.flush()) == 3
        assert [r["chosen"] for r in store.recent_routes()] == ["m4", "m3", "m2"]
        assert (route_log.pending, route_log.written) == (0, 3)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "2 entries dropped" in warnings[0]


def test_a_failed_write_keeps_its_entries_for_the_next_one(tmp_path, caplog):
    """Disk full (or the database locked past its busy timeout): the entries of the failed write
    go back in front of the buffer and are written once it works again; only what overflows the
    buffer is dropped, and the same failure again is not logged again."""
    caplog.set_level(logging.INFO, logger="satroute.routelog")
    with Store(tmp_path) as store:
        route_log = RouteLog(store, flush_s=3600, max_pending=4)
        write, tried = store.log_routes, []

        def full(entries, keep=0):
            tried.append([e.chosen for e in entries])
            if len(tried) == 1:  # requests answered while the write was going on
                for n in (3, 4):
                    route_log.record("auto", f"m{n}")
            raise sqlite3.OperationalError("database or disk is full")

        store.log_routes = full
        for n in range(3):
            route_log.record("auto", f"m{n}")
        assert asyncio.run(route_log.flush()) == 0
        assert (route_log.pending, route_log.dropped) == (4, 1)  # m0: one more than max_pending
        assert asyncio.run(route_log.flush()) == 0  # still full
        assert tried == [["m0", "m1", "m2"], ["m1", "m2", "m3", "m4"]]
        store.log_routes = write  # space again
        assert asyncio.run(route_log.flush()) == 4
        assert [r["chosen"] for r in store.recent_routes()] == ["m4", "m3", "m2", "m1"]
        assert (route_log.pending, route_log.written, route_log.dropped) == (0, 4, 1)
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(logged) == 2
    assert logged[0][0] == "ERROR" and "3 entries not written, kept for the next write (1 dropped" in logged[0][1]
    assert logged[1] == ("INFO", "routing log: written again (4 entries)")


def test_flush_keeps_only_the_newest_rows(tmp_path):
    with Store(tmp_path) as store:
        route_log = RouteLog(store, flush_s=3600, keep=4)
        for batch in range(3):
            for n in range(3):
                route_log.record("auto", "m1", request_id=f"req-{batch}-{n}")
            asyncio.run(route_log.flush())
        ids = [r["request_id"] for r in store.recent_routes(limit=100)]
    assert ids == ["req-2-2", "req-2-1", "req-2-0", "req-1-2"]


def test_opening_an_old_database_adds_the_new_columns_and_keeps_old_rows(tmp_path):
    old = sqlite3.connect(tmp_path / DB_NAME)
    old.executescript("""
        CREATE TABLE routing_log (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
            requested TEXT NOT NULL, chosen TEXT NOT NULL, scores TEXT, scorer_ms REAL);
        INSERT INTO routing_log (at, requested, chosen, scores, scorer_ms)
            VALUES (1700000000.5, 'auto', 'old-model', '{"old-model": 0.7}', 3.5);
    """)
    old.close()
    with Store(tmp_path) as store:
        columns = [r[1] for r in store._db.execute("PRAGMA table_info(routing_log)")]
        assert columns[-3:] == ["failed", "request_id", "degraded"]
        store.log_routes([RouteEntry("auto", "new-model", {"new-model": 0.9}, 1.0,
                                     failed=(("old-model", "connection"),), request_id="req-new",
                                     degraded="scorer_timeout")])
        new, old_row = store.recent_routes()
    assert old_row == {"at": 1700000000.5, "requested": "auto", "chosen": "old-model",
                       "scores": {"old-model": 0.7}, "scorer_ms": 3.5, "failed": None,
                       "request_id": None, "degraded": None}
    assert new["failed"] == [{"model": "old-model", "reason": "connection"}]
    assert new["request_id"] == "req-new" and new["degraded"] == "scorer_timeout"
    with Store(tmp_path) as store:  # opening again changes nothing
        assert [r[1] for r in store._db.execute("PRAGMA table_info(routing_log)")] == columns
        assert len(store.recent_routes()) == 2


def test_openapi_describes_the_routing_log(tmp_path, upstream, start_proxy):
    proxy = serve(tmp_path, upstream, start_proxy)
    op = httpx.get(f"{proxy.base}/openapi.json", timeout=10).json()["paths"]["/admin/routes"]["get"]
    (limit,) = op["parameters"]
    assert (limit["name"], limit["in"], limit["schema"]["maximum"]) == ("limit", "query", 1000)
    assert {"200", "400", "401"} <= set(op["responses"])


@pytest.mark.parametrize("stream", [False, True])
def test_request_no_model_answered_is_logged_with_every_failure(tmp_path, upstream, start_proxy, stream):
    proxy = serve(tmp_path, upstream, start_proxy, scores={"m1": 0.9, "m2": 0.5, "m3": 0.1})
    for name in ("m1", "m2", "m3"):
        upstream.set(name, fail(503))
    with pytest.raises(openai.APIStatusError) as info:
        client(proxy).chat.completions.create(model="auto", messages=MESSAGES, stream=stream,
                                              extra_headers={"X-Request-ID": "req-all-failed"})
    assert info.value.status_code >= 500
    (entry,) = wait_for_routes(proxy, 1)
    assert entry["chosen"] is None and entry["request_id"] == "req-all-failed"
    assert entry["failed"] == [{"model": m, "reason": "http_503"} for m in ("m1", "m2", "m3")]
    assert entry["scores"] == {"m1": 0.9, "m2": 0.5, "m3": 0.1}
