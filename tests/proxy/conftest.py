"""Fixtures for the proxy tests: a mock upstream, providers.yaml writers, a running proxy."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest
import yaml

from proxy.app import create_app
from proxy.settings import Settings
from support.mock_upstream import MockUpstream
from support.proxy_server import ProxyServer

FAST_ROUTER = {
    "num_retries": 2, "retry_backoff_s": 0.01, "retry_backoff_max_s": 0.05,
    "retry_after_max_s": 5, "timeout_s": 2.0, "deadline_s": 8.0, "max_fallbacks": 2,
    "allowed_fails": 3, "cooldown_s": 30,
}


class RecordingScorer:
    """Scores from a table (default 0); records what it was asked."""

    def __init__(self, table: Mapping[str, float] | None = None):
        self.table = dict(table or {})
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def score(self, instruction: str, candidates: Mapping[str, Mapping[str, float]]):
        with self.lock:
            self.calls.append((instruction, dict(candidates)))
        return {name: self.table.get(name, 0.0) for name in candidates}


@pytest.fixture(scope="session")
def mock_server() -> Iterator[MockUpstream]:
    with MockUpstream() as up:
        yield up


@pytest.fixture
def upstream(mock_server: MockUpstream) -> MockUpstream:
    mock_server.reset()
    return mock_server


def profile_file(folder: Path, name: str, acc: float = 0.5) -> str:
    path = folder / f"{name}.profile.json"
    path.write_text(json.dumps({"model": name, "suite": "test",
                                "tasks": {"t1": acc, "t2": 1 - acc}}))
    return path.name


def model_entry(name: str, base: str, folder: Path | None = None, *, profile: bool = True,
                key: str | None = None, fast_path: bool | None = None,
                upstream_name: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"model": f"openai/{upstream_name or name}", "api_base": base}
    if key:
        params["api_key"] = key
    info: dict[str, Any] = {"input_price_per_mtok": 0.1, "output_price_per_mtok": 0.2,
                            "context_window": 8192}
    if profile and folder is not None:
        info["capability_profile"] = profile_file(folder, name)
    if fast_path is not None:
        info["fast_path"] = fast_path
    return {"model_name": name, "litellm_params": params, "model_info": info}


def write_config(path: Path, models: list[dict[str, Any]], **router: Any) -> Path:
    path.write_text(yaml.safe_dump({"model_list": models,
                                    "router_settings": {**FAST_ROUTER, **router}}))
    return path


@pytest.fixture
def config(tmp_path: Path, upstream: MockUpstream) -> Path:
    """Three routable models (m1, m2, m3) on the mock upstream."""
    models = [model_entry(n, upstream.url, tmp_path) for n in ("m1", "m2", "m3")]
    return write_config(tmp_path / "providers.yaml", models)


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyServer]]:
    """Starts proxies on loopback; their state directory is the test's own (``tmp_path/state``),
    never the working directory's."""
    servers: list[ProxyServer] = []

    def start(config: Path, scorer: Any = None, scorer_kind: str = "constant",
              **settings: Any) -> ProxyServer:
        opts = {"config": config, "scorer": scorer_kind, "reload_interval_s": 0.1,
                "state_dir": tmp_path / "state", **settings}
        server = ProxyServer(create_app(Settings(**opts), scorer=scorer)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
