"""Resident memory of a whole ``satroute serve`` (the proxy and the local model servers it starts),
at start-up and once it has routed and answered: what a container's memory limit must allow.

    .venv/bin/python bench/serve_memory.py [--config providers.yaml] [--fresh-cache]
                                           [--requests 20] [--json OUT.json]

Starts ``satroute serve`` on 127.0.0.1 with ``--config`` (default: the repository's providers.yaml,
whose hosted models count as available with placeholder keys when their variables are unset: they
are scored, never called) and a state folder of its own. ``--fresh-cache`` points
``SATROUTE_CACHE_DIR`` at a new, empty folder, as on a fresh machine or an empty container volume
(the scorer's LLM is then converted from its GGUF first); otherwise the usual cache is used, as on
any later start. The resident memory of the process tree (``ps``) is sampled every 0.2 s from the
start until ``/ready`` answers 200, then while ``--requests`` rounds each score an ``auto`` request
(``POST /admin/route``, no model called) and, where the configuration has a ``local_server`` model,
have it answer a 32-token chat completion. Prints the start's peak, the peak and the resident
memory at the end, in MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDERS = {"OPENAI_API_KEY": "sk-placeholder-for-memory-bench",
                "ANTHROPIC_API_KEY": "sk-ant-placeholder-for-memory-bench"}


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and every process below it."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid=,rss="], capture_output=True, text=True).stdout.split("\n")
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for row in rows:
        fields = row.split()
        if len(fields) == 3:
            pid, ppid, kb = map(int, fields)
            children.setdefault(ppid, []).append(pid)
            rss[pid] = kb
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / 1024


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            time.sleep(0.2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "providers.yaml")
    p.add_argument("--fresh-cache", action="store_true")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scratch = Path(tempfile.mkdtemp(prefix="serve_memory_"))
    env = {**PLACEHOLDERS, **os.environ, "SATROUTE_STATE_DIR": str(scratch / "state"),
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "SATROUTE_ONBOARDING": "false"}
    if args.fresh_cache:
        env["SATROUTE_CACHE_DIR"] = str(scratch / "cache")
    models = yaml.safe_load(args.config.read_text())["model_list"]
    local = [m["model_name"] for m in models if (m.get("model_info") or {}).get("local_server") is not None]
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(args.config),
                             "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sampler = Sampler(proc.pid)
    sampler.start()
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"satroute serve exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - started > 900:
                raise SystemExit("not ready within 900 s")
            time.sleep(0.2)
        ready_s = time.monotonic() - started
        start_peak = sampler.peak
        routed = []
        for i in range(args.requests):
            messages = [{"role": "user", "content": f"Question {i}: what is {i} times {i + 3}? Explain briefly."}]
            r = httpx.post(f"{base}/admin/route", json={"model": "auto", "messages": messages}, timeout=60)
            routed.append(r.json().get("route") if r.status_code == 200 else r.status_code)
            if local:
                httpx.post(f"{base}/v1/chat/completions", timeout=120,
                           json={"model": local[0], "messages": messages, "max_tokens": 32}).raise_for_status()
        time.sleep(1.0)
        result = {"config": str(args.config), "fresh_cache": args.fresh_cache, "ready_s": round(ready_s, 1),
                  "start_peak_mib": round(start_peak), "peak_mib": round(sampler.peak),
                  "end_rss_mib": round(tree_rss_mb(proc.pid)), "requests": args.requests,
                  "routes": {k: routed.count(k) for k in set(map(str, routed))}, "local_model": local[:1]}
    finally:
        sampler.stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
