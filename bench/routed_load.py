"""Routed requests under concurrent load with the real Model-SAT scorer: end-to-end latency, the
scorer's share of it, and how many requests the scorer timeout sends to the profiles' means.

    .venv/bin/python bench/routed_load.py [--models 5] [--concurrency 1 4 16] [--requests 64]
                                          [--scorer-timeout 2.0] [--again] [--twins] [--json OUT.json]
                                          [--local-model] [--torch-threads N] [--spinners N]

What runs, all on 127.0.0.1: the mock upstream (tests/support/mock_upstream.py, answering at once)
and ``satroute serve`` with its default scorer and checkpoint, ``--models`` routable models (the
built-in MMLU-Pro profiles) on that upstream, ``router_settings.scorer_timeout_s`` as given. For each
concurrency, that many clients send ``--requests`` distinct ~120-token chat requests to ``auto``
between them; each request's wall time, ``x-satroute-scorer-ms`` and ``x-satroute-route`` are
recorded. Prints p50/p90 of both, requests per second, and the share routed by ``aptitude``.
With ``--again``, each concurrency's requests are then sent a second time, as a client's retries
would be (rows marked "again": the proxy answers them with the scores it remembers). With
``--twins``, every request is sent by two clients at the same moment (as a double submit or a
client's early retry would be); ``scorer_calls`` is how many scoring calls the proxy made for them.
With ``--local-model``, providers.yaml also holds the built-in local model (SmolLM2 on llama-cpp-python,
which the proxy starts; not routed to), and a client keeps it generating (256-token answers) while
each concurrency's requests run: the tokens it produced meanwhile are reported. ``--torch-threads``
sets SATROUTE_SCORER_TORCH_THREADS (default: the cores the local model and other processes leave).
With ``--spinners N``, N other processes each keep a core busy (a busy loop) while the requests run,
as an inference server or a build beside the proxy would.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from proxy_overhead import free_port, start, stop, wait_http  # noqa: E402
from scorer_latency import percentile  # noqa: E402

QUESTION = ("A train leaves the station at 9:40 and travels 214 km at an average speed of 82 km/h, "
            "stopping twice for six minutes each. At what time does it arrive, and how would the "
            "answer change if the second stop were cancelled? Explain each step of the reasoning. ")


def scorer_calls(base: str) -> float:
    """The proxy's count of scoring calls so far (its scorer latency histogram's count)."""
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("satroute_scorer_latency_seconds_count"):
            return float(line.split()[-1])
    return 0.0


async def load(url: str, concurrency: int, n: int, salt: int, twins: bool = False) -> dict:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    rows: list[dict] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body = {"model": "auto", "messages": [{"role": "user", "content": f"Case {salt}-{i}. {QUESTION}"}]}
            started = time.perf_counter()
            for r in await asyncio.gather(*(http.post(url, json=body) for _ in range(2 if twins else 1))):
                rows.append({"ms": (time.perf_counter() - started) * 1000, "status": r.status_code,
                             "route": r.headers.get("x-satroute-route"),
                             "scorer_ms": float(r.headers.get("x-satroute-scorer-ms", "nan"))})

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ok = [r for r in rows if r["status"] == 200]
    if not ok:
        raise SystemExit(f"no request answered 200 (statuses: {sorted({r['status'] for r in rows})})")
    return {"concurrency": concurrency, "requests": len(rows), "errors": len(rows) - len(ok), "rps": len(rows) / wall,
            "p50_ms": statistics.median(r["ms"] for r in ok), "p90_ms": percentile([r["ms"] for r in ok], 0.9),
            "scorer_p50_ms": statistics.median(r["scorer_ms"] for r in ok),
            "scorer_p90_ms": percentile([r["scorer_ms"] for r in ok], 0.9),
            "aptitude_share": sum(r["route"] == "aptitude" for r in ok) / max(1, len(ok))}


class generating:
    """With ``on``: a client keeps the local model answering 256-token requests while the block
    runs; yields a one-item list, the completion tokens it got."""

    def __init__(self, url: str, on: bool):
        self.url, self.on, self.tokens = url, on, [0]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            r = httpx.post(self.url, timeout=120, json={"model": "local", "max_tokens": 256, "messages": [
                {"role": "user", "content": "Write a long story about a dragon."}]})
            self.tokens[0] += (r.json().get("usage") or {}).get("completion_tokens", 0)

    def __enter__(self) -> list[int]:
        if self.on:
            self.thread.start()
            time.sleep(2)  # it is generating when the routed requests start
        return self.tokens

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.on:
            self.thread.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--scorer-timeout", type=float, default=2.0)
    ap.add_argument("--again", action="store_true", help="send each concurrency's requests a second time")
    ap.add_argument("--twins", action="store_true", help="send every request twice at the same moment")
    ap.add_argument("--json", default=None)
    ap.add_argument("--local-model", action="store_true", help="keep the built-in local model generating")
    ap.add_argument("--torch-threads", type=int, default=None, help="SATROUTE_SCORER_TORCH_THREADS")
    ap.add_argument("--spinners", type=int, default=0, help="other processes each keeping a core busy")
    a = ap.parse_args(argv)

    from scorer.aptitude import builtin_profiles

    names = sorted(builtin_profiles("mmlu_pro"))[: a.models]
    py = sys.executable
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        up_port, port = free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}/v1"
        entries = "".join(
            f"  - model_name: {n}\n    litellm_params: {{model: openai/{n}, api_base: \"{upstream}\"}}\n"
            f"    model_info: {{capability_profile: \"builtin:mmlu_pro/{n}\"}}\n" for n in names)
        if a.local_model:
            entries += ("  - model_name: local\n    litellm_params: {model: openai/local}\n    model_info: "
                        f"{{onboard: false, local_server: {{model: 'builtin:smollm2', port: {free_port()}, n_ctx: 2048}}}}\n")
        config = Path(tmp) / "providers.yaml"
        config.write_text(f"model_list:\n{entries}router_settings: {{scorer_timeout_s: {a.scorer_timeout}}}\n")
        env = {"SATROUTE_STATE_DIR": tmp, "SATROUTE_ONBOARDING": "false", "PYTHONPATH": str(REPO)}
        if a.torch_threads:
            env["SATROUTE_SCORER_TORCH_THREADS"] = str(a.torch_threads)
        try:
            procs.append(start([py, str(REPO / "tests/support/mock_upstream.py"), "--port", str(up_port)]))
            procs.append(start([py, "-m", "proxy.cli", "serve", "--config", str(config), "--port", str(port)],
                               env=env, log=Path(tmp) / "serve.log"))
            wait_http(f"http://127.0.0.1:{up_port}/v1/models")
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 120
            while time.time() < deadline:  # /ready: the scorer is loaded and warm (and the local model up)
                try:
                    if httpx.get(f"{base}/ready", timeout=2).status_code == 200 and (
                            not a.local_model or '"local"' in httpx.get(f"{base}/v1/models").text):
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                raise RuntimeError("the proxy did not become ready: " + (Path(tmp) / "serve.log").read_text()[-2000:])
            ready = httpx.get(f"{base}/ready").json()
            for _ in range(a.spinners):  # stopped with the others, in ``finally``
                procs.append(start([py, "-c", "while True: pass"]))
            if a.spinners:
                time.sleep(2.0)  # the proxy reads other processes' load once a second
            rows = []
            url = f"{base}/v1/chat/completions"
            for salt, c in enumerate(a.concurrency):
                calls = scorer_calls(base)
                with generating(url, a.local_model) as tokens:
                    rows.append(asyncio.run(load(url, c, a.requests, salt, a.twins)))
                rows[-1]["scorer_calls"] = scorer_calls(base) - calls
                rows[-1]["local_tokens"] = tokens[0]
                if a.again:  # the same requests once more: retries
                    calls = scorer_calls(base)
                    rows.append({**asyncio.run(load(url, c, a.requests, salt, a.twins)), "again": True})
                    rows[-1]["scorer_calls"] = scorer_calls(base) - calls
        finally:
            for p in reversed(procs):
                stop(p)
    report = {"models": a.models, "twins": a.twins, "spinners": a.spinners, "scorer": ready.get("scorer"), "scorer_timeout_s": a.scorer_timeout,
              "cpus": os.cpu_count(), "rows": rows}
    print(f"{a.models} routed models, scorer {ready.get('scorer')}, timeout {a.scorer_timeout} s, {os.cpu_count()} CPUs"
          + (", the local model generating meanwhile" if a.local_model else "")
          + (f", {a.spinners} other process(es) each keeping a core busy" if a.spinners else ""))
    print("| concurrency | requests | requests/s | p50 ms | p90 ms | scorer p50 ms | scorer p90 ms | scoring calls "
          "| ranked by aptitude | errors |" + (" local model tokens |" if a.local_model else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if a.local_model else ""))
    for r in rows:
        print(f"| {r['concurrency']}{' (again)' if r.get('again') else ''} | {r['requests']} | {r['rps']:.1f} | "
              f"{r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['scorer_p50_ms']:.0f} | {r['scorer_p90_ms']:.0f} | "
              f"{r['scorer_calls']:.0f} | {r['aptitude_share']:.0%} | {r['errors']} |"
              + (f" {r.get('local_tokens', 0)} |" if a.local_model else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
