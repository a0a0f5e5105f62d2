"""The proxy benchmark's children: a shell's SATROUTE_* settings must not reach the proxy it
measures (a master key makes every request a 401; a deployment's state dir would take the
benchmark's requests into its routing log)."""
from __future__ import annotations

import sys

from support import bench_module

proxy_overhead = bench_module.load("proxy_overhead")


def test_the_children_get_the_shell_s_environment_without_its_satroute_settings(monkeypatch):
    monkeypatch.setenv("SATROUTE_MASTER_KEY", "mk-secret")
    monkeypatch.setenv("SATROUTE_STATE_DIR", "/srv/satroute/state")
    monkeypatch.setenv("PATH_FOR_THE_BENCH", "kept")
    monkeypatch.setenv("SATROUTE_CACHE_DIR", "/srv/cache")  # where the backbones are: no new conversion
    env = proxy_overhead.child_env({"SATROUTE_STATE_DIR": "/tmp/bench-state"})
    assert "SATROUTE_MASTER_KEY" not in env
    assert env["SATROUTE_STATE_DIR"] == "/tmp/bench-state" and env["PATH_FOR_THE_BENCH"] == "kept"
    assert env["SATROUTE_CACHE_DIR"] == "/srv/cache"


def test_without_the_litellm_proxy_s_venv_the_bench_says_how_to_go_on(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["proxy_overhead.py", "--litellm-bin", str(tmp_path / "litellm")])
    monkeypatch.setattr(proxy_overhead.shutil, "which", lambda name: "/usr/bin/wrk")
    assert proxy_overhead.main() == 2
    assert "--skip-litellm" in capsys.readouterr().err
