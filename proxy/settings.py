"""Process settings: the only reader of environment variables in the proxy.

Owns: what the process needs before it can read providers.yaml (where that file is, where to
listen, the master key, which scorer to load, request size limits, where state and the routing log
are kept). Every field can be set by an environment variable with the ``SATROUTE_`` prefix
(``SATROUTE_MASTER_KEY``, ``SATROUTE_PORT``, ...); command-line flags are passed as constructor
arguments and win over the environment.
Does not know: models, routing policy or retries; those live in providers.yaml (``providers.py``)
so that they hot-reload.
"""
from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Iterable, Literal, Mapping
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("satroute.settings")
PREFIX = "SATROUTE_"


def describe_invalid(exc: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """One line naming each invalid setting and saying why (never the value: it may be a key):
    by the flag that gave it (``flags``: setting name -> flag), else by its environment variable."""
    named = []
    for err in exc.errors():
        key = "_".join(str(p) for p in err["loc"])
        said = err["msg"].removeprefix("Value error, ")  # a validator's own words
        named.append(f"{(flags or {}).get(key) or 'SATROUTE_' + key.upper()}: {said}")
    return "; ".join(named)


class Settings(BaseSettings):
    # NaN and infinity are no setting: a NaN spend cap compared false with every cost (no cap).
    # A variable set to nothing (compose's `SATROUTE_SCORER_DEVICE=`) is unset: "" was a device that
    # failed after the whole network loaded, a folder "." for the onboarding data, a spend cap error.
    model_config = SettingsConfigDict(env_prefix="SATROUTE_", extra="ignore", allow_inf_nan=False,
                                      env_ignore_empty=True)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("master_key")
    @classmethod
    def _sendable(cls, key: SecretStr | None) -> SecretStr | None:
        """A master key every client can send: ASCII. httpx and the openai SDKs refuse to send any
        other character in a header (UnicodeEncodeError, in the client), and the clients that do
        send one send it in Latin-1 or in UTF-8, of which only one could match: a proxy that
        started with such a key was open to curl and shut to the SDKs."""
        # its ends as master_key_value strips them: a file's closing line break is no fault
        value = key.get_secret_value().strip() if key is not None else ""
        if not value.isascii() or any((c < " " and c != "\t") or c == "\x7f" for c in value):
            raise ValueError("the key must be ASCII text (letters, digits, punctuation), on one "
                             "line: clients cannot send other characters in the Authorization "
                             "header")
        return key

    config: Path = Field(Path("providers.yaml"), description="path to providers.yaml")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    master_key: SecretStr | None = Field(
        None, description="when set, every /v1/* and admin request needs 'Authorization: Bearer'")
    scorer: Literal["modelsat", "constant"] = Field(
        "modelsat", description="modelsat: scorer.load_scorer(); constant: every candidate ties")
    scorer_checkpoint: str | None = None
    scorer_device: str | None = None
    scorer_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on CUDA cards (Ampere on) and CPUs with native bfloat16 "
                            "(AVX512-BF16, AMX), else float32")
    scorer_threads: int = Field(1, ge=1, description="threads that run scoring off the event loop")
    scorer_torch_threads: int | None = Field(
        None, ge=1, description="CPU threads torch uses for one scoring call; unset: the cores the "
        "local model servers answering at that moment leave, at least one")
    # images travel inside the body as base64: a phone photo alone is 5 to 10 MB of it
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    cors_origins: str = Field(
        "", description="comma-separated origins a browser may call from (CORS), '*' for any; "
                        "empty: no CORS headers")
    reload_interval_s: float = Field(1.0, gt=0, description="how often providers.yaml is checked")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per line (one line per request); text: plain")
    log_prompts: bool = Field(
        False, description="put the last user turn's text in each request's log line")
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight requests, streams and onboarding questions already sent may finish")
    shutdown_delay_s: float = Field(
        0.0, ge=0, description="on SIGTERM, how long the proxy goes on serving, /ready answering 503, "
        "before its shutdown begins: a load balancer takes it out of rotation first")
    keepalive_timeout_s: float = Field(
        75.0, gt=0, description="how long a client's connection is kept open idle between requests: "
        "above a load balancer's own idle timeout (AWS ALB 60 s, nginx upstream keepalive 60 s), "
        "which would otherwise send a request on a connection the proxy is closing")
    state_dir: Path = Field(
        Path("state"), description="persistent state (onboarding store); a volume in Docker")
    onboarding: bool = Field(
        True, description="onboard models without a capability profile in the background")
    onboarding_data: Path | None = Field(
        None, description="folder with the aptitude questions (prompts.jsonl.gz); default: the "
        "routing data if present, else MMLU-Pro from the Hugging Face hub")
    onboarding_hub: bool = Field(True, description="may fetch the questions from the hub")
    onboarding_suite: str = "mmlu_pro"
    onboarding_concurrency: int = Field(
        8, ge=1, le=256, description="questions in flight at once per provider account (the "
        "models sharing a provider, api_base and key, onboarded at once, share them)")
    onboarding_max_tokens: int = Field(2048, ge=16)
    onboarding_spend_cap_usd: float | None = Field(
        20.0, description="refuse to onboard a model whose estimated cost is above this (<0: none)")
    route_log: bool = Field(
        True, description="record each request to the router's name in the state store's routing "
        "log (GET /admin/routes)")
    route_log_flush_s: float = Field(
        1.0, gt=0, description="how often pending routing-log entries are written, in one commit")
    route_log_max_pending: int = Field(
        10000, ge=1, description="routing-log entries held in memory between writes; when full, "
        "the oldest are dropped (and counted in the log)")
    route_log_keep: int = Field(
        100000, ge=0, description="newest routing-log rows kept in the store, trimmed on each "
        "write (0: no limit)")

    def master_key_value(self) -> str | None:
        key = self.master_key.get_secret_value() if self.master_key else None
        # a key read from a file (a Docker or Kubernetes secret) ends in a line break that no
        # client sends: kept, it refused every request; blank, it is no key
        return (key.strip() or None) if key else None

    def cors_origin_list(self) -> list[str]:
        return [browser_origin(o.strip().rstrip("/")) for o in self.cors_origins.split(",") if o.strip()]


_DEFAULT_PORTS = {"http": 80, "https": 443}


def browser_origin(origin: str) -> str:
    """``origin`` as a browser writes it in its Origin header, which is matched exactly: scheme
    and host in lower case, an international host name in its ASCII form (``https://例え.jp``
    arrives as ``https://xn--r8jz45g.jp``), the scheme's default port left out. Anything that is
    no plain http(s) origin (``*``, a path, an app's own scheme) is left as it is."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return origin
    host, scheme = parts.hostname, parts.scheme.lower()
    if (scheme not in _DEFAULT_PORTS or not host or parts.path or parts.query or parts.fragment
            or "@" in parts.netloc):
        return origin
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        pass  # not a name IDNA can write: compared as it is
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != _DEFAULT_PORTS.get(scheme) else "")


# The SATROUTE_* variables read outside Settings, so none is a misspelt setting: where the scorer's
# converted weights (scorer/backbones.py) and the routing data (scorer/data.py) live, and the test
# suite's own (tests/conftest.py, tests/onboarding/proxy_process.py), which a test run hands on to
# the proxies it starts. A name read with os.environ anywhere else belongs here too.
READ_ELSEWHERE = ("SATROUTE_CACHE_DIR", "SATROUTE_DATA_DIR", "SATROUTE_SLOW_TESTS",
                  "SATROUTE_TEST_PROMPTS")


def unknown_variables(environ: Mapping[str, str],
                      also_read: Iterable[str] = ()) -> list[tuple[str, str | None]]:
    """Each ``SATROUTE_*`` variable in ``environ`` that nothing reads, in name order, with the
    variable it is closest to (None: none is close). A setting's variable is matched in any case,
    as pydantic-settings reads it; ``READ_ELSEWHERE`` and ``also_read`` (the names providers.yaml
    refers to with ``os.environ/``) in their exact case, as ``os.environ`` is read."""
    settings = {PREFIX + name.upper() for name in Settings.model_fields}
    elsewhere = {*READ_ELSEWHERE, *also_read}
    # compared after the prefix, which every candidate shares: with it, SATROUTE_FOO is as close
    # to SATROUTE_HOST as SATROUTE_MASTERKEY is to SATROUTE_MASTER_KEY
    known = {name[len(PREFIX):]: name for name in (*sorted(settings), *READ_ELSEWHERE)}
    unknown = []
    for name in sorted(environ):
        if not name.upper().startswith(PREFIX) or name.upper() in settings or name in elsewhere:
            continue
        rest = name[len(PREFIX):].upper()
        close = difflib.get_close_matches(rest, known, n=1, cutoff=0.8) or \
            [k for k in known if _one_edit_apart(rest, k)][:1]  # PROT, HOTS: short names' slips
        unknown.append((name, known[close[0]] if close else None))
    return unknown


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether one letter added, dropped, changed, or two neighbours swapped make ``a`` of ``b``."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def warn_unknown_variables(unknown: Iterable[tuple[str, str | None]]) -> None:
    """A warning for each of ``unknown_variables``: a misspelt setting is otherwise ignored without
    a word, and its default (onboarding on, the spend cap at 20 USD) is what runs. Names only,
    never a value: it may be a key."""
    for name, close in unknown:
        if close:
            log.warning("environment variable %s is not a setting satroute reads; did you mean %s?",
                        name, close)
        else:
            log.warning("environment variable %s is not a setting satroute reads; it is ignored", name)


def environ() -> dict[str, str]:
    """The environment, for resolving ``os.environ/VAR`` references in providers.yaml."""
    return dict(os.environ)


# litellm's switches to its bundled copy of what it would otherwise fetch from GitHub or its site:
# the cost map (at import), which beta headers Anthropic and Bedrock take (a blocking httpx.get, 5 s
# timeout, on the event loop, on the first request that carries one), and, for its own proxy server
# (never run here, set all the same), its blog posts, autorouter presets and policy templates.
LITELLM_LOCAL_SWITCHES = ("LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS",
                          "LITELLM_LOCAL_BLOG_POSTS", "LITELLM_LOCAL_AUTOROUTER_PRESETS",
                          "LITELLM_LOCAL_POLICY_TEMPLATES")


def prepare_litellm_environment() -> None:
    """litellm fetches nothing from the network on its own, at import or at a request (offline, a
    fetch would hold the event loop up to its timeout): set before importing it."""
    for name in LITELLM_LOCAL_SWITCHES:
        os.environ[name] = "True"
