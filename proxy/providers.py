"""providers.yaml: its schema, validation, credential and profile resolution, atomic hot reload.

Owns: the admin's file. A LiteLLM ``model_list`` loads as it is (``model_name`` + ``litellm_params``;
``api_key: os.environ/VAR`` references) as long as each ``model_name`` appears once (LiteLLM's
load-balancing form, one name over several deployments, is rejected with the duplicate named); our
own per-model keys live under ``model_info`` (prices, context window, capability profile) and the
router's under ``router_settings``. Other top-level LiteLLM sections (``litellm_settings``,
``general_settings``) are accepted and ignored.
The registry holds one immutable ``Snapshot``; a reload builds a new one completely and swaps the
reference, so a request always sees one consistent configuration. An invalid edit is logged and
the last good snapshot keeps serving. What is watched is content, not timestamps: the file's bytes
and those of the profile files it names, so an edit of a profile file reloads too.
A profile onboarding stored is used only for the upstream it was measured on
(``upstream_fingerprint``): another model or ``api_base`` under the same name has none.
Profiles measured on different aptitude suites are not comparable: a configuration that mixes them
still serves, with a warning naming the models of each suite (``Snapshot.mixed_suites``, in /ready).
Does not know: HTTP, litellm, scoring. Never logs or formats an API key.
"""
from __future__ import annotations

import asyncio
import difflib
import hashlib
import hmac
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from secrets import token_bytes, token_urlsafe
from typing import Any, Callable, Mapping, Protocol, Sequence
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.errors import ConfigError
from proxy.logs import Redactor
from proxy.prices import LITELLM_PRICE_KEYS, listed_flag, litellm_cost

log = logging.getLogger("satroute.providers")

Profile = Mapping[str, float]
ENV_PREFIX = "os.environ/"
BUILTIN_PREFIX = "builtin:"
UNKNOWN_SUITE = "unknown"  # what Snapshot.mixed_suites calls a profile that names no suite
# litellm providers that speak the OpenAI wire format as is: eligible for the pass-through path.
OPENAI_COMPATIBLE = frozenset({"openai", "hosted_vllm", "custom_openai", "llamafile", "lm_studio"})
# where a provider's models are asked when they have no api_base of their own
DEFAULT_BASES = {"openai": "https://api.openai.com/v1"}
# The content parts litellm's translation for a provider leaves out of what it sends, with no error:
# the model answered as if they were not there. As litellm 1.102's translation code reads them:
# Anthropic's (anthropic_messages_pt) sends text, images and files, not sound; so does Bedrock's
# (_bedrock_converse_messages_pt; Claude by invoke is Anthropic's); Ollama's chat and generate
# APIs (OllamaChatConfig.transform_request, ollama_pt) take text and images only; DeepSeek's
# (DeepSeekChatConfig) makes one string of every message's parts, but keeps a user turn's text and
# images for a model litellm's list says reads images (LITELLM_IMAGES_IF_LISTED); Mistral's
# (MistralConfig._transform_messages) makes one string of a request's parts unless one is an image
# or a file; Heroku's makes one string of every message's parts.
LITELLM_DROPPED_PARTS: Mapping[str, frozenset[str]] = {
    "anthropic": frozenset({"input_audio"}),
    "bedrock": frozenset({"input_audio"}),
    "deepseek": frozenset({"image_url", "input_audio", "file"}),
    "heroku": frozenset({"image_url", "input_audio", "file"}),
    "mistral": frozenset({"input_audio"}),
    "ollama": frozenset({"input_audio", "file"}),
    "ollama_chat": frozenset({"input_audio", "file"}),
}
# providers whose translation keeps images for the models litellm's own list marks
# ``supports_vision`` (and drops them for the others, its own names and unknown ones included)
LITELLM_IMAGES_IF_LISTED = frozenset({"deepseek"})
SECRET_WORDS = ("key", "secret", "token", "password", "authorization", "credential")
# llama_cpp.server flags a local_server block's args may not give (see LocalServerConfig).
RESERVED_LOCAL_FLAGS = frozenset({"host", "port", "model", "model_alias", "n_ctx", "n_threads",
                                  "n_threads_batch", "api_key", "config_file"})
# The chat formats for which llama-cpp-python's server loads an image handler, each with the
# --clip_model_path it needs (load_llama_from_model_settings in llama_cpp/server/model.py, 0.3.x).
# Under any other format, or none, the server loads no clip model and fails on every request whose
# content is a list of parts (a 500: "can only concatenate str (not "list") to str").
MULTIMODAL_CHAT_FORMATS = frozenset({"llava-1-5", "llava-1-6", "obsidian", "mtmd", "gemma4", "moondream",
                                     "nanollava", "llama-3-vision-alpha", "minicpm-v-2.6", "qwen2.5-vl"})


class ProfileSource(Protocol):
    """Where profiles of models without one in providers.yaml come from (the onboarding store):
    only a profile measured on ``upstream`` (an ``upstream_fingerprint``; or recorded by an
    earlier version as ``legacy``, its ``legacy_fingerprint``, or as one of ``also``,
    ``earlier_forms``) is returned."""

    def get(self, model_name: str, upstream: str, legacy: str | None = None,
            also: Sequence[str] = ()) -> Profile | None: ...

    def profile_suite(self, model_name: str) -> str | None:
        """The suite the profile ``get`` returns was measured on (None: not known)."""


def _null_is_empty(value: Any) -> Any:
    """A section whose keys are all commented out is YAML null: read it as an empty one."""
    return {} if value is None else value


class LitellmParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    api_base: str | None = None
    api_key: str | None = None


class LocalServerConfig(BaseModel):
    """``model_info.local_server``: the proxy runs llama-cpp-python's server for this model itself
    (a child process on 127.0.0.1:``port``; see proxy/localserver.py). ``api_base`` defaults to it,
    and ``api_key`` is always the registry's ``local_key``, which that server asks for."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("builtin:smollm2", min_length=1,
                       description="builtin:smollm2 or a .gguf path (relative to this file)")
    port: int = Field(8431, ge=1024, le=65535)
    n_ctx: int = Field(2048, ge=256)
    threads: int | None = Field(None, ge=1, description="None: half the CPU cores")
    args: list[str] = Field(default_factory=list, description="more llama_cpp.server flags")
    startup_timeout_s: float = Field(120.0, gt=0)

    @field_validator("n_ctx")
    @classmethod
    def _whole_blocks(cls, n_ctx: int) -> int:
        """Rounded up to a multiple of 256: llama.cpp pads the context so, while llama-cpp-python
        sizes its buffers by the number given, and a prompt or answer that fits the padding but
        not the number was a 500 (not the 400 or ``length`` a full context gets)."""
        return -(-n_ctx // 256) * 256

    @field_validator("args")
    @classmethod
    def _not_ours(cls, args: list[str]) -> list[str]:
        """The flags the proxy sets, and those that would open the server beyond loopback or lock
        the proxy out (llama_cpp.server's parser takes the last of a repeated flag)."""
        for arg in args:
            flag = _flag(arg)
            # argparse takes an abbreviation (--hos) for the whole flag
            if flag and any(reserved.startswith(flag) for reserved in RESERVED_LOCAL_FLAGS):
                raise ValueError(f"{arg.split('=', 1)[0]} is set by the proxy or would take the "
                                 "server off loopback; it cannot be given in args")
        return args

    @field_validator("args")
    @classmethod
    def _clip_with_its_format(cls, args: list[str]) -> list[str]:
        """A ``--clip_model_path`` only beside a multimodal ``--chat_format``: under another one
        the server ignores the clip model, and the model, taken to read images, failed on every
        request with content parts (its 500, retried, cooled the model for everyone)."""
        clip, chat_format = _given(args, "clip_model_path"), _given(args, "chat_format")
        if clip is not None and chat_format not in MULTIMODAL_CHAT_FORMATS:
            chosen = f"--chat_format {chat_format}" if chat_format is not None else "no --chat_format"
            raise ValueError(f"--clip_model_path needs a multimodal --chat_format "
                             f"({', '.join(sorted(MULTIMODAL_CHAT_FORMATS))}), the one the model "
                             f"was made for: with {chosen} llama-cpp-python's server loads no "
                             "image handler and fails on every request with content parts")
        return args

    @property
    def own_chat_format(self) -> bool:
        """Whether ``args`` choose llama-cpp-python's chat handler (``--chat_format``): some build
        grammars of every tool, not only of one the request forces."""
        return _given(self.args, "chat_format") is not None

    @property
    def vision(self) -> bool:
        """Whether the server reads images: llama-cpp-python's loads an image handler only for a
        multimodal ``--chat_format`` (``MULTIMODAL_CHAT_FORMATS``) with a ``--clip_model_path``."""
        return (_given(self.args, "chat_format") in MULTIMODAL_CHAT_FORMATS
                and _given(self.args, "clip_model_path") is not None)


def _flag(arg: str) -> str:
    """The llama_cpp.server flag ``arg`` names, as written (``--chat-format=x``: ``chat_format``);
    empty for a value."""
    return arg.split("=", 1)[0].replace("-", "_").lstrip("_") if arg.startswith("-") else ""


def _given(args: list[str], name: str) -> str | None:
    """The value ``args`` give llama_cpp.server's flag ``name``, as its parser reads them: the last
    one given, under the flag's name or an abbreviation (argparse takes any prefix naming one
    flag), after ``=`` or as the next argument; None when the flag is not given."""
    value = None
    for i, arg in enumerate(args):
        flag = _flag(arg)
        if flag and name.startswith(flag):
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
    return value


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    local_server: LocalServerConfig | None = None
    onboard: bool = Field(True, description="false: never give this model the aptitude test")
    input_price_per_mtok: float | None = Field(None, ge=0)
    output_price_per_mtok: float | None = Field(None, ge=0)
    context_window: int | None = Field(None, gt=0)
    # LiteLLM's keys for what a model can read: false leaves it out of routing for requests that
    # need it (image, audio or file parts; tools); unset: it is not left out
    supports_vision: bool | None = None
    supports_function_calling: bool | None = None
    supports_audio_input: bool | None = None
    supports_pdf_input: bool | None = None
    capability_profile: str | None = None
    fast_path: bool | None = None  # None: decided from the provider (see OPENAI_COMPATIBLE)


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    model_name: str = Field(min_length=1)
    litellm_params: LitellmParams
    model_info: ModelInfo = Field(default_factory=ModelInfo)

    _model_info_null = field_validator("model_info", mode="before")(_null_is_empty)


class RouterSettings(BaseModel):
    # LiteLLM's own router_settings keys (routing_strategy, ...) are accepted and ignored.
    model_config = ConfigDict(extra="allow")
    router_name: str = Field("auto", min_length=1)
    routing_context_tokens: int = Field(512, ge=16)
    num_retries: int = Field(2, ge=0, le=10)
    retry_backoff_s: float = Field(0.25, ge=0)
    retry_backoff_max_s: float = Field(4.0, ge=0)
    retry_after_max_s: float = Field(30.0, ge=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    # an attempt that hangs leaves time for the next model within the deadline, and the deadline
    # ends before the openai SDKs' own 600 s: a client gets the proxy's answer (the next model's,
    # or a 504 it is told not to retry), not its own timeout and two retries of the whole cascade
    timeout_s: float = Field(300.0, gt=0, description="one attempt, until the first byte")
    deadline_s: float = Field(
        590.0, gt=0, description="dispatch to the answer or first chunk, retries and fallbacks included")
    client_write_timeout_s: float = Field(
        60.0, gt=0, description="longest a streamed answer waits for a client that stopped reading")
    max_fallbacks: int = Field(2, ge=0)
    scorer_timeout_s: float = Field(
        2.0, gt=0, description="longest wait for the scorer; then the profiles' means rank the request")
    # the scorer's time grows with the candidates (a forward pass each): on a CPU, 60 of them took
    # about 2 s, the timeout above, and most requests were ranked by the means alone
    max_scored_candidates: int = Field(
        20, ge=0, description="the candidates the scorer reads, those with the best profile means; "
        "the rest are tried after them (0: every candidate)")
    allowed_fails: int = Field(3, ge=1, description="consecutive failures before a cooldown")
    cooldown_s: float = Field(30.0, ge=0)
    # a failure that names its wait (Retry-After, a rate limit's reset) cools its model that long,
    # up to this: an hourly or daily limit keeps it out for its hour, not for 30 s at a time
    cooldown_max_s: float = Field(3600.0, gt=0, description="longest cooldown a named wait sets")
    fast_path: bool = True
    default_model: str | None = Field(
        None, description="where the router's name goes while no candidate has a profile")


class ProvidersFile(BaseModel):
    model_config = ConfigDict(extra="allow")
    model_list: list[ModelEntry] = Field(min_length=1)
    router_settings: RouterSettings = Field(default_factory=RouterSettings)

    _router_settings_null = field_validator("router_settings", mode="before")(_null_is_empty)

    @model_validator(mode="after")
    def _names_unique(self) -> "ProvidersFile":
        seen: set[str] = set()
        for i, entry in enumerate(self.model_list):
            if entry.model_name in seen:
                raise ValueError(f"model_list.{i}.model_name: duplicate name {entry.model_name!r}")
            if entry.model_name == self.router_settings.router_name:
                raise ValueError(f"model_list.{i}.model_name: {entry.model_name!r} is the router's "
                                 "name (router_settings.router_name)")
            seen.add(entry.model_name)
        default = self.router_settings.default_model
        if default is not None and default not in seen:
            raise ValueError(f"router_settings.default_model: {default!r} is not a model_name "
                             "of model_list")
        ports = [e.model_info.local_server.port for e in self.model_list
                 if e.model_info.local_server is not None]
        if len(ports) != len(set(ports)):
            raise ValueError(f"model_info.local_server.port: two local servers share a port "
                             f"({sorted(ports)})")
        return self


@dataclass(frozen=True)
class Deployment:
    """One configured model, resolved: credentials looked up, profile loaded."""

    name: str
    model: str  # the litellm model string, e.g. "openai/gpt-4o-mini"
    provider: str
    upstream_model: str  # the model id the upstream itself knows
    api_base: str | None
    api_key: str | None = field(repr=False)
    params: Mapping[str, Any] = field(repr=False)  # other litellm_params, resolved
    info: ModelInfo
    profile: Profile | None
    unavailable: str | None  # why the model cannot be called, or None
    fast_path: bool
    # the suite the profile was measured on: as its file says (providers.yaml), or as onboarding
    # stored it; None when not known
    profile_suite: str | None = None

    @property
    def available(self) -> bool:
        return self.unavailable is None

    @property
    def routable(self) -> bool:
        return self.unavailable is None and self.profile is not None

    @property
    def dropped_parts(self) -> frozenset[str]:
        """The types of content part this model is never sent: those litellm's translation for
        its provider (``custom_llm_provider``, else the one its model names) leaves out
        (``LITELLM_DROPPED_PARTS``), when it is called through litellm."""
        if self.fast_path:
            return frozenset()
        provider = str(self.params.get("custom_llm_provider") or self.provider)
        dropped = LITELLM_DROPPED_PARTS.get(provider, frozenset())
        if provider in LITELLM_IMAGES_IF_LISTED and listed_flag(self.model, provider, "supports_vision"):
            dropped -= {"image_url"}
        return dropped


def upstream_fingerprint(d: Deployment) -> str:
    """What answers for a model name: its provider (``openai`` where ``litellm_params.model`` names
    none) and the model id the upstream knows, and ``api_base`` as it reaches the upstream
    (``_plain_base``), hashed. The same upstream written another way (``fake`` or ``openai/fake``,
    a trailing ``/``, ``LOCALHOST``, a rotated password in the URL, the provider's own
    ``api_base`` written out or left out: ``DEFAULT_BASES``) has the same fingerprint; a profile
    measured on another upstream (another host, 127.0.0.1 for localhost included) is stale."""
    base = _plain_base(d.api_base)
    if base and base == _plain_base(DEFAULT_BASES.get(d.provider)):
        base = ""  # the form of a model that names no api_base, as every version has recorded it
    return _fingerprint(f"{d.provider}/{d.upstream_model}", base)


def plain_fingerprint(d: Deployment) -> str:
    """``upstream_fingerprint`` as the version before it computed it: the provider's own
    ``api_base`` written out not taken for the empty base (``DEFAULT_BASES``). The store's
    ``upstream_plain`` column is written in this form, which that version compares with its own,
    so that it finds the upstream it would have recorded itself when it is started again on the
    store (a rollback) with the same file. It is ``upstream_fingerprint(d)`` unless the model names
    its provider's own base, and one of ``earlier_forms(d)`` then."""
    return _fingerprint(f"{d.provider}/{d.upstream_model}", _plain_base(d.api_base))


def legacy_fingerprint(d: Deployment) -> str:
    """The fingerprint earlier versions recorded for ``d``: of ``litellm_params.model`` and
    ``api_base`` as written. A store holding it measured the same upstream as one holding
    ``upstream_fingerprint(d)``; it is kept as it is (earlier versions sharing the store read it),
    and it is the form a new row's ``upstream`` is recorded in, beside today's."""
    return _fingerprint(d.model, d.api_base or "")


def earlier_forms(d: Deployment) -> tuple[str, ...]:
    """Fingerprints earlier versions recorded for the upstream ``d`` names that neither
    ``upstream_fingerprint(d)`` nor ``legacy_fingerprint(d)`` is: for a model on its provider's
    own ``api_base`` (``DEFAULT_BASES``), that base written out and left out, in both forms. A
    store written before the two were one upstream keeps its profile whichever way the file now
    writes it."""
    default = DEFAULT_BASES.get(d.provider)
    base = _plain_base(d.api_base)
    if default is None or base not in ("", _plain_base(default)):
        return ()
    forms = {_fingerprint(f"{d.provider}/{d.upstream_model}", _plain_base(default)),
             _fingerprint(d.model, default), _fingerprint(d.model, "")}
    return tuple(sorted(forms - {upstream_fingerprint(d), legacy_fingerprint(d)}))


def fingerprints(d: Deployment) -> tuple[str, str, tuple[str, ...]]:
    """Every form the upstream ``d`` names may be stored under, as ``Store.get``,
    ``Store.upstream_changed`` and ``Store.using`` take them: ``upstream_fingerprint``,
    ``legacy_fingerprint`` and ``earlier_forms`` (one place computes the three, so that no caller
    compares with fewer)."""
    return upstream_fingerprint(d), legacy_fingerprint(d), earlier_forms(d)


def upstream_account(d: Deployment) -> str:
    """What the models sharing one provider account have in common, whose rate limits they share:
    the provider; the upstream, ``api_base`` as it reaches it (``_plain_base``), the provider's
    own where it has none (``DEFAULT_BASES``: one OpenAI key written with and without
    ``api_base: https://api.openai.com/v1`` is one account); and whom it knows the requests to
    come from: the API key, the credentials in ``api_base`` (``user:password@``), the
    ``organization`` and the ``extra_headers`` that carry credentials (``_ACCOUNT_HEADERS``, by
    any case of their name), so that teams on one gateway with keys of their own are accounts
    of their own. For this process only (onboarding paces the models on one account together):
    hashed with a key made at start, so that what holds the credentials can neither be read back
    nor used to test guesses of them, should it ever be logged; never stored."""
    base = d.api_base or DEFAULT_BASES.get(d.provider)
    headers = d.params.get("extra_headers")
    sent = sorted((str(k).lower(), str(v)) for k, v in headers.items()
                  if str(k).lower() in _ACCOUNT_HEADERS) if isinstance(headers, dict) else []
    text = json.dumps([d.provider, _plain_base(base), _userinfo(base), d.api_key or "",
                       str(d.params.get("organization") or ""), sent]).encode()
    return hmac.new(_ACCOUNT_KEY, text, hashlib.sha256).hexdigest()[:16]


_ACCOUNT_KEY = token_bytes(32)  # upstream_account's: this process's own
# extra_headers that say whom a request comes from: a key (OpenAI's Authorization, Azure's
# api-key, Anthropic's x-api-key, Gemini's x-goog-api-key), or the OpenAI organization or project
# whose rate limits it counts against
_ACCOUNT_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "x-goog-api-key",
                              "openai-organization", "openai-project"})


def _userinfo(api_base: str | None) -> str:
    """The credentials ``api_base`` names before its host (``user:password``), as written; ""
    when it names none."""
    if not api_base:
        return ""
    try:
        netloc = urlsplit(api_base).netloc
    except ValueError:  # not a URL at all: the call reports it
        return ""
    return netloc.rpartition("@")[0]


def _fingerprint(model: str, api_base: str) -> str:
    """Hashed, so that a secret in a URL never reaches the store."""
    return hashlib.sha256(f"{model}\n{api_base}".encode()).hexdigest()[:16]


def _plain_base(api_base: str | None) -> str:
    """``api_base`` without what does not change the upstream: credentials (``user:password@``),
    the case of its scheme and host, a trailing ``/``. The port, path and query are kept as
    written."""
    if not api_base:
        return ""
    try:
        url = urlsplit(api_base)
    except ValueError:  # not a URL at all: as written
        return api_base.rstrip("/")
    host = url.netloc.rpartition("@")[2].lower()
    return urlunsplit((url.scheme.lower(), host, url.path.rstrip("/"), url.query, url.fragment))


@dataclass(frozen=True)
class Snapshot:
    source: str
    models: Mapping[str, Deployment]  # in config order
    router: RouterSettings
    secrets: tuple[str, ...] = field(repr=False)

    def available(self) -> list[Deployment]:
        return [d for d in self.models.values() if d.available]

    def mixed_suites(self) -> dict[str, list[str]] | None:
        """The models that have a profile, by the aptitude suite it was measured on (``unknown``
        for a profile whose suite is not known), in config order; None when they are all of one
        suite. The scorer compares profiles as they are: accuracies measured on different
        questions (RouterDC's 4-option ones, MMLU-Pro's 10-option ones) favour the easier suite's
        models, so a mix is reported (a warning, /ready), never routed on silently."""
        suites: dict[str, list[str]] = {}
        for d in self.models.values():
            if d.profile is not None:
                suites.setdefault(d.profile_suite or UNKNOWN_SUITE, []).append(d.name)
        return suites if len(suites) > 1 else None

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


# keys satroute reads beyond a section's declared fields (left untyped: any may be os.environ/VAR)
_READ_TOO: dict[type[BaseModel], tuple[str, ...]] = {
    LitellmParams: ("timeout", "drop_params", "custom_llm_provider", "extra_body", "extra_headers",
                    "organization")}


def _warn_misspelt(path: Path, raw: dict) -> None:
    """A warning for each unknown key, at the top level, in a ``model_list`` entry, its
    ``litellm_params`` or ``model_info``, or ``router_settings``, that is close to one of ours
    (``capabilty_profile``, ``api_bsae``): each takes LiteLLM's own keys too, so an unknown key is
    not an error, but a misspelt ``capability_profile`` would have the model onboarded, at a cost,
    and a misspelt ``api_base`` sends the prompts and the key to the provider's public endpoint.
    Read from the YAML as it is, so a rejected file gets its hints too (``modle_list``)."""
    sections: list[tuple[str, Any, type[BaseModel]]] = [
        ("", raw, ProvidersFile), ("router_settings.", raw.get("router_settings"), RouterSettings)]
    entries = raw.get("model_list")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        sections.append((f"model_list.{i}.", entry, ModelEntry))
        if isinstance(entry, dict):
            sections += [(f"model_list.{i}.litellm_params.", entry.get("litellm_params"), LitellmParams),
                         (f"model_list.{i}.model_info.", entry.get("model_info"), ModelInfo)]
    for where, section, model in sections:
        if not isinstance(section, dict):
            continue
        known = [*model.model_fields, *_READ_TOO.get(model, ())]
        for key in map(str, section):
            if key in known:  # ours, spelt right: the usual case, and cheap
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            if close and close[0] != key:
                log.warning("%s: %s%s is not a key satroute reads; did you mean %s?",
                            path, where, key, close[0])


# LiteLLM's per-deployment limits: its router enforces them, satroute does not
_NOT_ENFORCED = ("rpm", "tpm", "max_parallel_requests")


def _warn_litellm_keys(path: Path, raw: dict) -> None:
    """A warning for each model whose entry sets one of LiteLLM's rate limits: a LiteLLM file
    loads as it is, and an admin who kept them would otherwise believe the upstream protected;
    and for a LiteLLM price that is no price (onboarding's spend counts it as free)."""
    entries = raw.get("model_list")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        for section in ("litellm_params", "model_info"):
            given = entry.get(section) if isinstance(entry, dict) else None
            if not isinstance(given, dict):
                continue
            keys = [k for k in _NOT_ENFORCED if k in given]
            if keys:
                log.warning("%s: model_list.%d.%s: %s: LiteLLM's rate limits are not enforced by "
                            "satroute (a model's 429 is retried, then cools it down)",
                            path, i, section, ", ".join(keys))
            unread = [k for k in LITELLM_PRICE_KEYS if given.get(k) is not None
                      and not str(given[k]).startswith(ENV_PREFIX) and litellm_cost(given[k]) is None]
            if unread:  # the spend cap would count that side as free
                log.warning("%s: model_list.%d.%s: %s: not a price (USD per token, a number 0 or "
                            "more); onboarding counts it as free", path, i, section, ", ".join(unread))


# libyaml's parser where PyYAML was built with it (its wheels are): a reload runs on the event loop,
# and the pure-Python parser took about 1 ms per model of providers.yaml
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):
    """PyYAML's safe loader, noting every key given twice in one mapping: it keeps the last value,
    as LiteLLM does, so such a file is not rejected, but the first value is silently lost."""

    def __init__(self, text: str):
        super().__init__(text)
        self.duplicates: list[tuple[str, int]] = []  # (key, line)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if (key_node.tag, key_node.value) in seen:
                self.duplicates.append((key_node.value, key_node.start_mark.line + 1))
            seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep=deep)


def _describe_validation(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if not loc:  # a check across the file (its message names the key): the value is the file
            lines.append(f"{path}: {err['msg'].removeprefix('Value error, ')}")
            continue
        value = err.get("input")
        shown = "***" if _secret(loc) else repr(_masked(value))[:120]
        lines.append(f"{path}: {loc}: {err['msg']} (value: {shown})")
    return "; ".join(lines)


def _secret(key: str) -> bool:
    return any(w in key.lower() for w in SECRET_WORDS)


_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_URL_QUERY = re.compile(r"(?<=\?)[^#\s]*")


def _masked(value: Any) -> Any:
    """A copy of a YAML value with every secret-looking key's value hidden, and in every string the
    credentials a URL may carry (``user:password@``, the query string)."""
    if isinstance(value, dict):
        return {k: "***" if _secret(str(k)) else _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return _URL_QUERY.sub("***", _URL_USERINFO.sub("***@", value))
    return value


def _describe_yaml(exc: yaml.YAMLError) -> str:
    """Problem and position only: PyYAML's own message quotes the line, which may hold a key."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or type(exc).__name__
    context = getattr(exc, "context", None)
    return f"{context + ': ' if context else ''}{problem}{where}"


def _resolve(value: Any, env: Mapping[str, str], key: str = "",
             secrets: list[str] | None = None,
             from_env: set[str] | None = None) -> tuple[Any, str | None]:
    """``value`` with its ``os.environ/VAR`` references replaced, at any depth (``extra_headers:
    {api-key: os.environ/X}``), and the first unset variable it names (None: all set). Into
    ``secrets`` go, at any depth, every string under a secret-like name (``SECRET_WORDS``) and
    every value of 16 characters or more read from the environment under another name (a
    credential kept in a variable need not be named like one; short values such as a timeout
    would blank out unrelated text), ``model`` excepted: what redaction must hide. Into
    ``from_env`` go all values read from the environment."""
    if isinstance(value, dict):
        out, first = {}, None
        for k, v in value.items():
            out[k], missing = _resolve(v, env, str(k), secrets, from_env)
            first = first or missing
        return out, first
    if isinstance(value, list):
        items = [_resolve(v, env, key, secrets, from_env) for v in value]
        return [v for v, _ in items], next((m for _, m in items if m), None)
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        var = value[len(ENV_PREFIX):]
        # a value read from a file (a Kubernetes or Docker secret, `$(cat key)`) ends in a line
        # break, which no header or URL may carry
        got = (env.get(var) or "").strip()
        if not got:
            return None, var
        if from_env is not None:
            from_env.add(got)
        if secrets is not None and (_secret(key) or (len(got) >= 16 and key != "model")):
            secrets.append(got)
        return got, None
    if secrets is not None and isinstance(value, str) and value and _secret(key):
        secrets.append(value)
    return value, None


def _load_profile(ref: str, base: Path, where: str) -> tuple[dict[str, float], str | None]:
    """The profile a ``capability_profile`` reference names, and the suite its file says."""
    if ref.startswith(BUILTIN_PREFIX):
        # the scorer's own resolution (no torch): a model name with a `/` (RouterDC's, the one
        # the profile file and `satroute evaluate` give) names the file that spells it `--`
        from scorer.aptitude import builtin_profile_path
        from scorer.data import DataError

        try:
            file = builtin_profile_path(ref)
        except DataError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    else:
        file = (base / ref).resolve()
    try:
        data = json.loads(file.read_text())
        tasks = data["tasks"]
        profile = {str(k): float(v) for k, v in tasks.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{where}: cannot read capability profile {ref!r} ({file}): "
                          f"{type(exc).__name__}: {exc}") from None
    if not profile or not all(0.0 <= v <= 1.0 for v in profile.values()):
        raise ConfigError(f"{where}: capability profile {ref!r} needs accuracies in [0, 1]")
    suite = data.get("suite")
    return profile, suite if isinstance(suite, str) else None


def _profile_files(raw: bytes, base: Path) -> tuple[Path, ...]:
    """The local profile files providers.yaml's bytes name, read tolerantly (none when they do not
    parse: ``parse`` reports that). ``builtin:`` profiles ship with the package: never watched."""
    try:
        conf = yaml.load(raw, Loader=_SafeLoader)  # noqa: S506 (a safe loader)
    except (yaml.YAMLError, ValueError, RecursionError):
        return ()
    entries = conf.get("model_list") if isinstance(conf, dict) else None
    files = []
    for entry in entries if isinstance(entries, list) else []:
        info = entry.get("model_info") if isinstance(entry, dict) else None
        ref = info.get("capability_profile") if isinstance(info, dict) else None
        if isinstance(ref, str) and ref and not ref.startswith(BUILTIN_PREFIX):
            files.append(base / ref)
    return tuple(files)


_ENV_REFERENCE = re.compile(re.escape(ENV_PREFIX) + r"([A-Za-z_][A-Za-z0-9_]*)")


def env_references(path: Path) -> frozenset[str]:
    """The variables providers.yaml at ``path`` names with ``os.environ/``, found in its text (a
    comment's too): a ``SATROUTE_*`` one among them is the admin's, no misspelt setting. Empty when
    the file cannot be read (loading it says why)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    return frozenset(_ENV_REFERENCE.findall(text))


def _unreadable(path: Path, exc: OSError) -> str:
    """Why providers.yaml cannot be read, in one line."""
    if isinstance(exc, FileNotFoundError):
        return f"{path}: file not found"
    if isinstance(exc, IsADirectoryError):
        return (f"{path}: is a directory, not a file (a Kubernetes ConfigMap mounted without "
                "subPath? name the file inside it)")
    return f"{path}: cannot read it: {exc.strerror or type(exc).__name__}"


def parse(text: str, path: Path, env: Mapping[str, str],
          lookup: Callable[[Deployment], Profile | None], local_key: str | None = None) -> Snapshot:
    """Validate providers.yaml's text and resolve it into a Snapshot; ConfigError names the key.
    ``lookup`` gives the profile of a model without one in the file (onboarding's), or None.
    ``local_key`` is the ``api_key`` of every model with a ``local_server`` (the key its server
    is started with; one in ``litellm_params`` is not used), and a secret of the snapshot."""
    loader = _Loader(text)
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_describe_yaml(exc)}") from None
    except ValueError:  # a converter's (no position; its message quotes the value)
        raise ConfigError(f"{path}: not valid YAML: a date, !!int or !!float value cannot be "
                          "converted") from None
    finally:
        loader.dispose()
    for key, line in loader.duplicates:
        log.warning("%s: line %d: key %s appears twice in the same mapping; the last value counts",
                    path, line, key)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with a model_list")
    _warn_misspelt(path, raw)
    _warn_litellm_keys(path, raw)
    try:
        conf = ProvidersFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe_validation(path, exc)) from None
    models: dict[str, Deployment] = {}
    secrets: list[str] = []
    written_keys: set[str] = set()  # api_key values written as they are, not read from the environment
    from_env: set[str] = set()
    for i, entry in enumerate(conf.model_list):
        where = f"{path}: model_list.{i}"
        params = dict(entry.litellm_params.model_dump(exclude_none=True))
        written_key = params.get("api_key")
        if isinstance(written_key, str) and written_key and not written_key.startswith(ENV_PREFIX):
            written_keys.add(written_key)
        unavailable = None
        for key in list(params):
            params[key], missing = _resolve(params[key], env, key, secrets, from_env)
            if missing:
                unavailable = f"litellm_params.{key} references unset environment variable {missing}"
        model = params.pop("model") or ""  # unset: os.environ/ names a missing variable
        provider, _, rest = model.partition("/")
        if not rest:
            provider, rest = "openai", model
        info = entry.model_info
        profile: Profile | None = None
        suite: str | None = None
        if info.capability_profile:
            profile, suite = _load_profile(info.capability_profile, path.parent,
                                           f"{where}.model_info.capability_profile")
        fast = conf.router_settings.fast_path and provider in OPENAI_COMPATIBLE
        if info.fast_path is not None:
            fast = info.fast_path and conf.router_settings.fast_path
        api_base = params.pop("api_base", None)
        if api_base is None and info.local_server is not None:
            api_base = f"http://127.0.0.1:{info.local_server.port}/v1"
        api_key = params.pop("api_key", None)
        if info.local_server is not None and local_key:
            api_key = local_key
            secrets.append(local_key)
        headers = params.get("extra_headers")
        authorization = isinstance(headers, dict) and any(str(k).lower() == "authorization" for k in headers)
        if unavailable is None and (api_key or authorization) and _has_userinfo(api_base):
            # one Authorization header cannot carry both: every call would fail before it is sent
            unavailable = ("litellm_params.api_base carries credentials (user:password@) and "
                           f"{'api_key' if api_key else 'extra_headers.Authorization'} "
                           "is set too: give the model one of them")
        if unavailable is None:
            unavailable = _unsendable(api_base, api_key, params, litellm_path=not fast)
        d = Deployment(
            name=entry.model_name, model=model, provider=provider, upstream_model=rest,
            api_base=api_base, api_key=api_key,
            params=params, info=info, profile=profile, unavailable=unavailable, fast_path=fast,
            profile_suite=suite)
        models[entry.model_name] = d if info.capability_profile else replace(d, profile=lookup(d))
    # a placeholder written as a key (Ollama's `ollama`, LM Studio's `lm-studio`) that a model's
    # name or id holds is public already, and no secret: redacted, `ollama-qwen` was
    # `[redacted]-qwen` in the log and in /ready, and two such models one; a value read from the
    # environment stays a secret whatever the names hold
    public = [*models, *(d.model for d in models.values())]
    placeholders = {k for k in written_keys - from_env if any(k in p for p in public)}
    secrets = sorted({s for s in secrets if len(s) >= 4 and s not in placeholders},
                     key=len, reverse=True)
    return Snapshot(source=str(path), models=models, router=conf.router_settings,
                    secrets=tuple(secrets))


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # a tab is allowed inside a header value


def _unsendable(api_base: Any, api_key: Any, params: Mapping[str, Any], *,
                litellm_path: bool = True) -> str | None:
    """Why no call to the model could be sent as configured (every one would fail before it
    leaves, a 500 or a connection error in the middle of routing), or None."""
    if api_base is not None:
        try:
            url = urlsplit(str(api_base))
            ok = url.scheme.lower() in ("http", "https") and bool(url.hostname)
        except ValueError:
            ok = False
        if not ok:
            shown = _shown_base(str(api_base))
            return ("litellm_params.api_base is not an http:// or https:// URL with a host"
                    + (f" ({shown!r})" if shown else ""))
    headers = params.get("extra_headers")
    sent = {"api_key": api_key, "organization": params.get("organization"),
            **({f"extra_headers.{k}": v for k, v in headers.items()} if isinstance(headers, dict) else {})}
    for key, value in sent.items():
        if not isinstance(value, str):
            continue
        if _CONTROL.search(value):
            return (f"litellm_params.{key} holds a control character (a line break inside it?): "
                    "no HTTP header can carry it")
        # litellm's HTTP client sends header values as ASCII only, and every call failed before
        # it left (a 500 each, the model cooled again and again); a key or organization id is
        # ASCII at every provider, so a character beyond it (a zero-width space pasted with the
        # key) is a mistake on either path; the direct path sends other headers' UTF-8 bytes
        header = key.startswith("extra_headers.")
        if (litellm_path or not header) and not value.isascii():
            at = next(i for i, c in enumerate(value) if not c.isascii())
            return (f"litellm_params.{key} holds a non-ASCII character (U+{ord(value[at]):04X} at "
                    f"position {at})"
                    + (": this model's calls go through litellm, which sends header values as "
                       "ASCII only" if header else ": a character pasted with it?"))
    return None


def _shown_base(api_base: str) -> str | None:
    """What a reason may quote of an ``api_base``: its scheme, host and path, as far as they can be
    told apart; never its query or fragment (``?access_token=...``), nor credentials
    (``user:password@``). None when nothing can be shown so: the reason goes to the log and to
    the public ``/ready``."""
    try:
        url = urlsplit(api_base)
    except ValueError:
        return None
    shown = urlunsplit((url.scheme, url.netloc.rpartition("@")[2], url.path, "", ""))
    # written without a scheme (`admin:pw@host/v1`), credentials are read as the path
    return shown if shown and "@" not in shown else None


def _has_userinfo(url: Any) -> bool:
    """Whether ``url`` names credentials before its host (``https://user:pass@host``)."""
    if not isinstance(url, str):
        return False
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:  # not a URL at all: the call reports it
        return False


def _redacted(text: str, snapshot: Snapshot) -> str:
    """``text`` with ``snapshot``'s secrets (and credential-shaped strings) redacted, as the log
    redacts them. What the registry logs about a configuration it is building is redacted here: the
    log's own redactor reads the secrets of the configuration served, which at start-up is none
    yet, and after an edit lacks those the edit adds."""
    return Redactor(lambda: snapshot.secrets)(text)


class ProviderRegistry:
    """The live configuration: one Snapshot at a time, swapped whole on reload or profile change.

    ``local_key``: the key the proxy's own local servers are started with and asked with (see
    ``parse``); by default a new random one, for this registry's life (the process's)."""

    def __init__(self, path: Path, env: Callable[[], Mapping[str, str]],
                 profile_source: ProfileSource | None = None, local_key: str | None = None):
        self.path = Path(path)
        self._env = env
        self._source = profile_source
        # a model's own local server answers only the proxy: without it anyone on the machine (or
        # a web page, its CORS allows any origin) would use the model past the master key
        self.local_key = local_key or token_urlsafe(32)
        # model -> (profile, its suite), set at run time (onboarding), kept over reloads
        self._profiles: dict[str, tuple[Profile, str | None]] = {}
        self._mixed: dict[str, list[str]] | None = None  # the mix of suites last warned about
        self._down: dict[str, str] = {}  # model -> why it is down (set at run time)
        self._scan: tuple[bytes, tuple[Path, ...]] = (b"", ())  # file digest -> profile files it names
        self._read_error: str | None = None  # the read failure last logged
        self._key_rejected: str | None = None  # why the file last acted on was not taken, or None
        self._unsettled: bytes | None = None  # a change seen once, taken when seen again unchanged
        # called with (old, new) after an edit of the file is swapped in
        self.on_reload: list[Callable[[Snapshot, Snapshot], None]] = []
        # what else can make a configured model unusable (the dispatcher: a provider litellm does
        # not know), asked for each available model whenever the snapshot is derived
        self.checks: list[Callable[[Deployment], str | None]] = []
        self._flagged: dict[str, str] = {}  # model -> the check's reason last logged
        self._base: Snapshot
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(_unreadable(self.path, exc)) from None
        self._key = self._change_key(raw)
        self._acted = self._scan[0]
        self.snapshot = self._build(self._text(raw))

    def _text(self, raw: bytes) -> str:
        """The file's bytes as text; ``ConfigError`` (naming the position, never the bytes) when
        they are not UTF-8, as a file saved by an editor in Latin-1 or cp1252 may be."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{self.path}: not UTF-8 text (line {line}, byte {exc.start}); "
                              "save it as UTF-8") from None

    @property
    def file_digest(self) -> bytes:
        """The sha256 of the providers.yaml bytes last acted on: taken into the snapshot, or
        rejected. Not a change read once and held back to settle: what the snapshot holds is still
        the earlier file's, and work stamped with this digest must be done with that snapshot."""
        return self._acted

    def _change_key(self, raw: bytes) -> bytes:
        """What a reload compares: the file's bytes and those of the local profile files it names
        (an edited profile file, or one copied in after the file that names it, is a change too)."""
        digest = hashlib.sha256(raw).digest()
        if self._scan[0] != digest:
            self._scan = (digest, _profile_files(raw, self.path.parent))
        key = hashlib.sha256(digest)
        for file in self._scan[1]:
            try:
                key.update(b"+" + hashlib.sha256(file.read_bytes()).digest())
            except OSError as exc:
                key.update(b"-" + type(exc).__name__.encode())
        return key.digest()

    def _lookup(self, d: Deployment) -> tuple[Profile | None, str | None]:
        """The profile onboarding gave a model (set at run time, or stored for its upstream) and
        the suite it was measured on; (None, None) while it has none."""
        if d.name in self._profiles:
            return self._profiles[d.name]
        if self._source is None:
            return None, None
        profile = self._source.get(d.name, *fingerprints(d))
        return profile, None if profile is None else self._source.profile_suite(d.name)

    def _build(self, text: str) -> Snapshot:
        # profiles from onboarding are looked up once, by _derive (a store read per model)
        base = parse(text, self.path, self._env(), lambda d: None, self.local_key)
        for d in base.models.values():
            if d.unavailable:
                log.warning("model %s unavailable: %s", d.name, _redacted(d.unavailable, base))
        self._base = base
        self._mixed = None  # a load or reload says again what it still mixes
        return self._derive()

    def _derive(self) -> Snapshot:
        """The parsed file plus what is known at run time (profiles, models marked down)."""
        base = self._base
        models = {}
        flagged = {}
        for name, d in base.models.items():
            profile, suite = ((d.profile, d.profile_suite) if d.info.capability_profile
                              else self._lookup(d))
            why = d.unavailable or self._down.get(name)
            if why is None:
                why = next((r for r in (check(d) for check in self.checks) if r is not None), None)
                if why is not None:
                    flagged[name] = why
                    if self._flagged.get(name) != why:
                        log.warning("model %s unavailable: %s", name, _redacted(why, base))
            models[name] = replace(d, profile=profile, profile_suite=suite, unavailable=why)
        self._flagged = flagged
        snapshot = replace(base, models=models)
        self._warn_mixed(snapshot.mixed_suites())
        return snapshot

    def _warn_mixed(self, mixed: dict[str, list[str]] | None) -> None:
        """A warning when the profiles are of several suites: at every load and reload, and when
        a profile onboarding adds (or a model it forgets) changes the mix."""
        if mixed is not None and mixed != self._mixed:
            log.warning("capability profiles measured on different aptitude suites are compared in "
                        "routing, though their accuracies are not on one scale (the models of the "
                        "easier suite are favoured): %s. Give every model a profile of one suite "
                        "(docs/configuration.md, \"Capability profiles and suites\")",
                        "; ".join(f"{suite}: {', '.join(names)}" for suite, names in mixed.items()))
        self._mixed = mixed

    def reload(self, settle: bool = False) -> bool:
        """Re-read the file and the profile files it names; True when a changed, valid
        configuration was swapped in. A failure is logged once, not on every call.

        ``settle`` (the watch): a change is taken only once a later call reads the same bytes, so a
        file an editor is still writing (truncated, then written in pieces) is never taken even
        when its first part is valid YAML: a model missing for a moment, or an ``api_base`` cut
        short, would fail requests and make onboarding forget a model's answers."""
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            why = _unreadable(self.path, exc)
            if why != self._read_error:
                log.error("config reload failed, keeping the last good configuration: %s", why)
                self._read_error = why
            return False
        self._read_error = None
        key = self._change_key(raw)
        if key == self._key:
            self._unsettled = None
            return False
        if settle and key != self._unsettled:  # changed since the last look: look again next tick
            self._unsettled = key
            return False
        self._unsettled = None
        self._key = key  # set before building: a bad edit is reported once
        self._acted = self._scan[0]
        old = self.snapshot
        try:
            self.snapshot = self._build(self._text(raw))
        except ConfigError as exc:
            log.error("config reload rejected, keeping the last good configuration: %s", exc)
            self._key_rejected = str(exc)
            return False
        except Exception as exc:  # noqa: BLE001 (a bug must not end hot reload for good)
            # its type only: a message or repr may quote the file, keys included
            self._key_rejected = f"{self.path}: unexpected {type(exc).__name__}"
            log.error("config reload failed, keeping the last good configuration: %s", self._key_rejected)
            return False
        self._key_rejected = None
        log.info("config reloaded from %s: %d models", self.path, len(self.snapshot.models))
        for listener in self.on_reload:
            listener(old, self.snapshot)
        return True

    def reload_now(self, why: str) -> None:
        """Check the file now (``why``: what asked, SIGHUP), as the watch does but taking a change
        at once (whoever asks has finished the edit), and log what came of it in one line: taken,
        unchanged, or not taken, the last good configuration serving on. Never raises."""
        try:
            changed = self.reload()
        except Exception as exc:  # noqa: BLE001 (as in the watch: no edit may end the process)
            log.error("%s: config check failed, keeping the last good configuration: %s",
                      why, type(exc).__name__)
            return
        if changed:
            log.info("%s: %s checked: reloaded, %d models", why, self.path, len(self.snapshot.models))
        elif self.rejected is not None:
            log.warning("%s: %s checked: not taken, keeping the last good configuration: %s",
                        why, self.path, self.rejected)
        else:
            log.info("%s: %s checked: unchanged", why, self.path)

    @property
    def rejected(self) -> str | None:
        """Why the file on disk is not the configuration served (it cannot be read, or its last
        edit was rejected), as logged; None when it is. Shown in /ready and as a metric, so an edit
        that did not land is not known only from one log line, or from the restart it fails."""
        why = self._read_error or self._key_rejected
        # as logged: /ready is open, and a rejected edit's values (an extra_headers token) are in it
        return None if why is None else _redacted(why, self.snapshot)

    async def watch(self, interval_s: float, stopping: Callable[[], bool] = lambda: False) -> None:
        """Reload every ``interval_s`` until cancelled (run from the app's lifespan). Each tick
        reads and hashes the file and its profile files, no more when nothing changed: content,
        not timestamps, so an edit of the same size within the file system's timestamp tick is
        seen too. An edit is taken once two ticks in a row read it the same (``reload(settle=True)``).
        Once ``stopping()`` (the shutdown has begun) no edit is taken: each is logged once, as
        not applied."""
        failing = None
        held = None  # the edit last logged as not applied
        while True:
            await asyncio.sleep(interval_s)
            try:
                if stopping():
                    held = self._hold(held)
                    continue
                self.reload(settle=True)
                failing = None
            except Exception as exc:  # noqa: BLE001 (the watch must outlive any one edit)
                if type(exc).__name__ != failing:  # once, not every tick
                    log.error("config reload failed: %s", type(exc).__name__)
                failing = type(exc).__name__

    def _hold(self, logged: bytes | None) -> bytes | None:
        """Take no edit, the proxy is stopping: a reload then would start work the shutdown has
        already stopped (a local model's new server, in a process on its way out). An edit not
        logged yet (``logged``: the last one that was) is logged; the one logged now is returned."""
        try:
            key = self._change_key(self.path.read_bytes())
        except OSError:
            return logged
        if key in (self._key, logged):
            return logged
        log.info("%s edited: not applied, the proxy is stopping (its next start reads it)",
                 self.path)
        return key

    def set_profile(self, model_name: str, profile: Profile, suite: str | None = None) -> None:
        """Make a model routable with this profile, measured on ``suite`` (None: not known)."""
        self._profiles[model_name] = (dict(profile), suite)
        self.refresh_profiles()

    def refresh_profiles(self) -> None:
        """Ask the profile source again for every model without a profile in providers.yaml, and
        the ``checks`` again for every model."""
        self.snapshot = self._derive()

    def set_unavailable(self, model_name: str, reason: str | None) -> None:
        """Mark a model down (left out of routing and /v1/models) with a reason, or back up (None)."""
        if reason is None:
            self._down.pop(model_name, None)
        else:
            self._down[model_name] = reason
        self.snapshot = self._derive()
