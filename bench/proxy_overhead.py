"""Proxy overhead: latency added over calling the upstream directly, and throughput, against the
LiteLLM proxy in front of the same upstream. Prints its figures; not a test.

    .venv/bin/python bench/proxy_overhead.py                 # full run (about 4 minutes)
    .venv/bin/python bench/proxy_overhead.py --duration 3 --rounds 1 --concurrency 1 8
    .venv/bin/python bench/proxy_overhead.py --profile /tmp/prof.txt   # pyinstrument the proxy

What runs, all on 127.0.0.1:
- the upstream: tests/support/mock_upstream.py (asyncio + httptools + uvloop), answering at once;
- satroute: ``python -m proxy.cli serve`` with the constant scorer (so only the proxy is measured),
  one routed model (``model: auto``), its state (routing log) in a temporary folder, and none of
  this shell's ``SATROUTE_*`` settings (a master key, a deployment's state dir);
- the LiteLLM proxy: ``litellm --config`` from a separate venv (--litellm-bin; default
  .bench-venv/bin/litellm, set up with ``python3 -m venv .bench-venv &&
  .bench-venv/bin/pip install 'litellm[proxy]==1.102.4'``), same upstream;
- the load: wrk (C, one thread, keep-alive connections), so the client is not the bottleneck.
For each mode (non-streaming, streaming) and concurrency, targets are measured in turn (direct,
satroute, litellm), ``--rounds`` times interleaved; the median over rounds is reported.
Added latency = the proxy's percentile minus the direct call's, for the full response.
First, in-process: the per-call cost of ``litellm.acompletion`` against the same upstream, next to a
plain pooled aiohttp POST (why OpenAI-compatible upstreams get the pass-through path).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


# Where files are found, not how the proxy behaves: kept for the children.
LOCATIONS = ("SATROUTE_CACHE_DIR", "SATROUTE_DATA_DIR")


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This shell's environment without its SATROUTE_* settings (a master key would make every
    request a 401, a state dir would put the benchmark's requests in a deployment's routing log),
    but with the variables that only locate files (the backbones' cache, the data), plus ``env``."""
    own = {k: v for k, v in os.environ.items() if not k.startswith("SATROUTE_") or k in LOCATIONS}
    return {**own, **(env or {})}


def start(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None
          ) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, env=child_env(env), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parse_wrk(text: str) -> dict[str, float]:
    lat = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        lat[f"p{pct}"] = float(value) * UNITS[unit]
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: (.*)", text)
    return {"p50": lat.get("p50", float("nan")), "p99": lat.get("p99", float("nan")),
            "rps": float(rps.group(1)) if rps else float("nan"),
            "errors": float(errors.group(1)) if errors else 0.0,
            "sock": sock.group(1) if sock else ""}


def wrk(url: str, body: dict, conc: int, duration: float, script_dir: Path) -> dict[str, float]:
    script = script_dir / f"post_{abs(hash(json.dumps(body)))}.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{json.dumps(body)}]]\n")
    out = subprocess.run(["wrk", "-t1", f"-c{conc}", f"-d{max(1, round(duration))}s", "--latency",
                          "--timeout", "10s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=duration + 60)
    return parse_wrk(out.stdout)


async def sdk_overhead(upstream: str, n: int) -> dict[str, float]:
    """Per-call latency of litellm.acompletion vs a pooled aiohttp POST, same upstream, in-process."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import aiohttp
    import litellm

    litellm.suppress_debug_info = True
    body = {"model": "m1", "messages": [{"role": "user", "content": "hello"}]}
    results: dict[str, list[float]] = {"aiohttp": [], "litellm": []}
    async with aiohttp.ClientSession() as session:
        async def direct() -> None:
            async with session.post(f"{upstream}/chat/completions", json=body) as r:
                await r.read()

        async def via_litellm() -> None:
            await litellm.acompletion(model="openai/m1", api_base=upstream, api_key="none",
                                      messages=body["messages"], num_retries=0)

        for name, fn in (("aiohttp", direct), ("litellm", via_litellm)):
            for _ in range(20):
                await fn()
            for _ in range(n):
                t = time.perf_counter()
                await fn()
                results[name].append((time.perf_counter() - t) * 1000)
    return {k: statistics.median(v) for k, v in results.items()}


def write_configs(tmp: Path, upstream: str) -> tuple[Path, Path]:
    ours = tmp / "providers.yaml"
    profile = tmp / "m1.json"
    profile.write_text(json.dumps({"model": "m1", "suite": "bench", "tasks": {"t": 0.5}}))
    ours.write_text(f"""model_list:
  - model_name: m1
    litellm_params: {{model: openai/m1, api_base: "{upstream}"}}
    model_info: {{capability_profile: m1.json}}
""")
    theirs = tmp / "litellm.yaml"
    theirs.write_text(f"""model_list:
  - model_name: m1
    litellm_params: {{model: openai/m1, api_base: "{upstream}", api_key: none}}
""")
    return ours, theirs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--modes", nargs="+", default=["nonstream", "stream"])
    ap.add_argument("--litellm-bin", default=str(REPO / ".bench-venv" / "bin" / "litellm"))
    ap.add_argument("--skip-litellm", action="store_true")
    ap.add_argument("--sdk-calls", type=int, default=200)
    ap.add_argument("--profile", help="run satroute under pyinstrument; write the report here")
    ap.add_argument("--py-spy", dest="pyspy", help="run satroute under py-spy (on-CPU samples); "
                    "write collapsed stacks here and print where the time goes")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    if not args.skip_litellm and not Path(args.litellm_bin).exists():
        print(f"{args.litellm_bin} not found: set up the LiteLLM proxy's venv (this file's docstring) "
              "or pass --skip-litellm", file=sys.stderr)
        return 2
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="satroute-bench-"))
    up_port, our_port, their_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    ours_cfg, theirs_cfg = write_configs(tmp, upstream)
    procs = []
    try:
        procs.append(start([py, str(REPO / "tests/support/mock_upstream.py"), "--port",
                            str(up_port)], log=tmp / "upstream.log"))
        wait_http(f"{upstream}/models", proc=procs[-1])
        if args.sdk_calls:
            sdk = asyncio.run(sdk_overhead(upstream, args.sdk_calls))
            print(f"per-call p50 in-process ({args.sdk_calls} sequential calls): pooled aiohttp "
                  f"{sdk['aiohttp']:.2f} ms, litellm.acompletion {sdk['litellm']:.2f} ms "
                  f"(litellm's own cost {sdk['litellm'] - sdk['aiohttp']:.2f} ms)")
        ours_cmd = [py, "-m", "proxy.cli", "serve", "--config", str(ours_cfg), "--port",
                    str(our_port), "--scorer", "constant"]
        if args.pyspy:
            spy = shutil.which("py-spy") or str(Path(args.litellm_bin).parent / "py-spy")
            ours_cmd = [spy, "record", "-f", "raw", "-r", "250", "-o", args.pyspy, "--", *ours_cmd]
        elif args.profile:
            ours_cmd = [py, "-m", "pyinstrument", "-r", "text", "-o", args.profile,
                        "--show-all", "-m", "proxy.cli", *ours_cmd[3:]]
        ours = start(ours_cmd, env={"SATROUTE_LOG_LEVEL": "warning", "SATROUTE_STATE_DIR": str(tmp / "state"),
                                    "SATROUTE_ONBOARDING": "false"}, log=tmp / "satroute.log")
        procs.append(ours)
        wait_http(f"http://127.0.0.1:{our_port}/ready", proc=ours)
        targets = {"direct": f"{upstream}/chat/completions",
                   "satroute": f"http://127.0.0.1:{our_port}/v1/chat/completions"}
        if not args.skip_litellm:
            procs.append(start([args.litellm_bin, "--config", str(theirs_cfg), "--host",
                                "127.0.0.1", "--port", str(their_port), "--num_workers", "1"],
                               env={"LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                    "LITELLM_LOG": "ERROR"}, log=tmp / "litellm.log"))
            wait_http(f"http://127.0.0.1:{their_port}/health/liveliness", timeout=180,
                      proc=procs[-1])
            targets["litellm"] = f"http://127.0.0.1:{their_port}/v1/chat/completions"
        models = {"direct": "m1", "satroute": "auto", "litellm": "m1"}
        table: dict[tuple[str, int, str], list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            for mode in args.modes:
                for conc in args.concurrency:
                    for name, url in targets.items():
                        body = {"model": models[name],
                                "messages": [{"role": "user", "content": "hello"}]}
                        if mode == "stream":
                            body["stream"] = True
                        wrk(url, body, conc, 1.0, tmp)  # warm-up
                        r = wrk(url, body, conc, args.duration, tmp)
                        table.setdefault((mode, conc, name), []).append(r)
                        print(f"round {rnd + 1} {mode:9s} c={conc:<3d} {name:9s} "
                              f"p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  "
                              f"{r['rps']:8.1f} req/s  non-2xx {int(r['errors'])} {r['sock']}",
                              flush=True)
        failed = {key: int(sum(r["errors"] for r in runs)) for key, runs in table.items()
                  if any(r["errors"] for r in runs)}
        if failed:  # figures of error answers are not the proxy's: no table of them
            print("non-2xx answers, so no table: " + ", ".join(f"{n} {m} c={c}: {k}" for (m, c, n), k in
                                                              failed.items()) + f" (logs in {tmp})", file=sys.stderr)
            return 1
        report(table, targets)
    finally:
        for p in reversed(procs):
            stop(p)
    if args.profile:
        print(f"profile written to {args.profile}")
    if args.pyspy:
        time.sleep(1)
        where_time_goes(Path(args.pyspy))
    return 0


# Leaf frames by component, first match wins (a leaf is where the CPU was when sampled).
COMPONENTS = [
    ("uvicorn (HTTP server, httptools)", ("uvicorn/", "httptools")),
    ("starlette (routing, middleware, responses)", ("starlette/",)),
    ("aiohttp (upstream client)", ("aiohttp/", "multidict", "yarl/", "aiohappyeyeballs")),
    ("request logs + metrics (proxy/logs.py, metrics.py)",
     ("proxy/logs.py", "proxy/metrics.py", "prometheus_client", "logging/")),
    ("tenacity (retry loop bookkeeping)", ("tenacity/",)),
    ("pydantic (request validation)", ("pydantic",)),
    ("proxy/ (our code)", ("proxy/",)),
    ("json / orjson", ("json/", "orjson")),
    ("asyncio / uvloop (event loop, tasks, timeouts)", ("asyncio/", "uvloop", "<built-in>")),
]
MARKERS = ["chat_completions", "RetryingDispatcher.complete", "PassThrough.attempt",
           "AsyncRetrying", "parse_request", "RequestLogMiddleware", "StreamingResponse",
           "Response.__call__", "_relay", "ScorerHost.score"]


def where_time_goes(raw: Path) -> None:
    """Summarise py-spy's collapsed stacks: on-CPU share by component and by key frame."""
    total, by_comp, by_marker = 0, {}, {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if "_find_and_load" in stack or "Server.startup" in stack:
            continue  # start-up and imports
        total += n
        leaf = frames[-1]
        comp = next((name for name, keys in COMPONENTS if any(k in leaf for k in keys)), "other")
        by_comp[comp] = by_comp.get(comp, 0) + n
        for m in MARKERS:
            if any(m in f for f in frames):
                by_marker[m] = by_marker.get(m, 0) + n
    if not total:
        print("py-spy: no samples")
        return
    print(f"\non-CPU samples of the satroute process while serving: {total}")
    print("self time by component (where the CPU was):")
    for name, n in sorted(by_comp.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("inclusive time under key frames:")
    for name, n in sorted(by_marker.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * n / total:5.1f}%  {name}")


def report(table, targets) -> None:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("p50", "p99", "rps")}
           for k, v in table.items()}
    print("\nmedian over rounds; added = proxy percentile - direct percentile")
    print("| mode | conc | target | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s |")
    print("|---|---|---|---|---|---|---|---|")
    for (mode, conc, name), m in sorted(med.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                       list(targets).index(kv[0][2]))):
        d = med[(mode, conc, "direct")]
        added = ("", "") if name == "direct" else (f"{m['p50'] - d['p50']:.2f}",
                                                   f"{m['p99'] - d['p99']:.2f}")
        print(f"| {mode} | {conc} | {name} | {m['p50']:.2f} | {m['p99']:.2f} | {added[0]} | "
              f"{added[1]} | {m['rps']:.0f} |")
    if "litellm" in targets:
        print("\nthroughput satroute / litellm:")
        for (mode, conc, name), m in sorted(med.items()):
            if name == "satroute":
                ratio = m["rps"] / med[(mode, conc, "litellm")]["rps"]
                print(f"  {mode:9s} c={conc:<3d} {ratio:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
