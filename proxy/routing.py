"""Routing policy: what the scorer reads, who the candidates are, and the ranked decision. Pure.

Owns: turning a chat into the instruction text the scorer scores (the last user turn, then as much
earlier user/assistant context as fits a token budget, newest first; system and tool messages
skipped; list content read for its text parts), choosing the candidates (routable, allowed by the
request, not cooling down) and ranking them by score (ties keep providers.yaml's order).
Does not know: HTTP, the scorer's internals, how a model is called. No I/O, no clock.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from proxy.errors import RequestError, ServiceUnavailable
from proxy.localserver import STARTING_RETRY_AFTER_S, coming_back
from proxy.protocol import header_name
from proxy.providers import Deployment

CONTEXT_ROLES = frozenset({"user", "assistant"})
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Decision:
    ranked: tuple[tuple[str, float], ...]  # best first
    routed: bool  # False: the client named a model
    scorer_ms: float = 0.0
    degraded: str | None = None  # why the profiles' means ranked it instead of the scorer
    remembered: bool = False  # the scores of an identical request: no scoring call of its own

    @property
    def chosen(self) -> str:
        return self.ranked[0][0]

    def scores_header(self) -> str:
        """``name=score`` pairs, best first; a candidate the scorer could not read or did not read
        (past ``max_scored_candidates``; ranked last) as ``-Infinity``, which JavaScript's
        ``parseFloat`` reads too (``-inf`` it reads as NaN)."""
        def number(score: float) -> str:
            if math.isfinite(score):
                return f"{score:.4f}"
            return "-Infinity" if score < 0 else "Infinity"

        return ",".join(f"{header_name(name)}={number(score)}" for name, score in self.ranked)


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters per token for English text and code)."""
    return (len(text) + 3) // 4


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message whose content is a string or a list of parts (non-text skipped)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _has_text(message: Mapping[str, Any]) -> bool:
    return bool(message_text(message).strip())


# Open WebUI's retrieval: its template (instructions, then the documents found in a <context>
# block) is put before the user's own turn, or (older versions) replaces it, with the question last
# in <user_query> tags; either way the question is what is routed, not the template's start
QUERY_OPEN, QUERY_CLOSE = "<user_query>", "</user_query>"
CONTEXT_OPEN, CONTEXT_CLOSE = "<context>", "</context>"


def _asked(text: str) -> str:
    """A user turn's own question when the turn is a retrieval template's, else the turn as it is.

    The template's shapes: documents (a ``<context>`` or ``<source`` block), then the question in
    ``<user_query>`` tags that end the turn, or that only the user's own words (the same question
    again: the template put before the turn) follow; or, with no such tags (Open WebUI's template
    since it stopped quoting the query), the ``<context>`` block and then the user's turn. A
    question that only quotes the tags, or a template with its placeholders (``{{QUERY}}``,
    ``{{CONTEXT}}``), is read whole. Found by string search, in linear time (a regex backtracked
    for seconds on an unclosed tag and a few KB of spaces)."""
    end = text.rfind(QUERY_CLOSE)
    if end >= 0:
        start = text.rfind(QUERY_OPEN, 0, end)
        if start < 0 or (CONTEXT_OPEN not in text[:start] and "<source" not in text[:start]):
            return text
        question = text[start + len(QUERY_OPEN):end].strip()
        after = text[end + len(QUERY_CLOSE):].strip()
        if not question or _placeholder(question) or after not in ("", question):
            return text
        return question
    close = text.rfind(CONTEXT_CLOSE)
    opened = text.rfind(CONTEXT_OPEN, 0, close) if close >= 0 else -1
    if opened < 0 or _placeholder(text[opened + len(CONTEXT_OPEN):close].strip()):
        return text
    question = text[close + len(CONTEXT_CLOSE):].strip()
    return question or text


def _placeholder(text: str) -> bool:
    return text.startswith("{{") and text.endswith("}}")


def _attached(text: str) -> bool:
    """Whether a text part reads as something attached to a question rather than typed: a fenced
    block (Continue's files and code) or a tagged one (``<environment_details>``, ``<task>``)."""
    start = text.lstrip()[:3]
    return start == "```" or start[:1] == "<"


def _turn_text(message: Mapping[str, Any]) -> str:
    """The text of the turn being routed, its own words first: of several text parts, the plain
    ones (what the user typed) before the attached ones, each in order. Continue sends the files
    and code a user attaches as fenced parts before the typed question; Cline and its forks send
    ``<task>`` then ``<environment_details>``, all tagged, which stay in order (the task first)."""
    content = message.get("content")
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if len(texts) > 1:
            typed = [t for t in texts if not _attached(t)]
            return "\n".join(typed + [t for t in texts if _attached(t)])
    return message_text(message)


def instruction_text(messages: Sequence[Mapping[str, Any]], budget_tokens: int) -> str:
    """The last user turn with text (cut to the budget) first, then the earlier turns that fit,
    newest first (one too long for what is left is skipped: a long answer does not hide the
    question before it).

    The request comes first because the scorer reads the start of this text (the served
    checkpoint: 64 tokens through phi, 256 through psi's instruction vector): a chat's earlier
    answers placed before it would push the question being routed out of what is read. For the
    same reason a retrieval template's question (``_asked``) stands for the turn that holds it:
    the template's instructions and documents come first, and every such request read alike."""
    last_user = next((i for i in range(len(messages) - 1, -1, -1)
                      if messages[i].get("role") == "user" and _has_text(messages[i])), None)
    if last_user is None:  # no user text at all: fall back to the newest message with text
        last_user = next((i for i in range(len(messages) - 1, -1, -1) if _has_text(messages[i])), None)
        if last_user is None:
            return ""
    head = _asked(_turn_text(messages[last_user]))
    if approx_tokens(head) >= budget_tokens:
        return head[: budget_tokens * 4]
    parts = [head]
    used = approx_tokens(head)
    for msg in reversed(messages[:last_user]):
        if msg.get("role") not in CONTEXT_ROLES:
            continue
        text = message_text(msg)
        if not text.strip():
            continue
        cost = approx_tokens(text) + 1
        if used + cost > budget_tokens:
            continue
        parts.append(text)
        used += cost
    return SEPARATOR.join(parts)


# characters per token for the context-window check: few tokenizers average more on real text, so
# the estimate errs low (a request it lets through that is too long falls back when the model
# says so), and a model is never passed over for a request it could have taken
CHARS_PER_TOKEN_AT_MOST = 5


def tokens_needed(body: Mapping[str, Any]) -> tuple[int, int]:
    """A low estimate of the context a chat request needs: (its messages' text, the completion
    tokens it asks for: ``max_completion_tokens`` or ``max_tokens``)."""
    chars = sum(len(message_text(m)) for m in body.get("messages") or () if isinstance(m, Mapping))
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    asked = asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else 0
    return chars // CHARS_PER_TOKEN_AT_MOST, asked


def context_window(d: Deployment) -> int | None:
    """A model's context window in tokens: ``model_info.context_window``, else a local server's
    ``n_ctx``; None when unknown."""
    if d.info.context_window is not None:
        return d.info.context_window
    return d.info.local_server.n_ctx if d.info.local_server is not None else None


def with_room(pool: list[Deployment], needed: tuple[int, int]) -> list[Deployment]:
    """The models of ``pool`` whose context window holds ``needed`` (prompt and completion tokens;
    for a local server, the prompt alone: llama-cpp-python shortens a completion to the room
    left, it refuses only a prompt too long), or whose window is unknown; when none does, those
    with the widest window (the one most likely to take it)."""
    prompt, completion = needed
    windows = {d.name: context_window(d) for d in pool}
    roomy = [d for d in pool if windows[d.name] is None
             or windows[d.name] >= prompt + (0 if d.info.local_server is not None else completion)]
    if roomy or not pool:
        return roomy
    widest = max(windows.values())  # every window is known here: an unknown one has room
    return [d for d in pool if windows[d.name] == widest]


# a content part's type -> the model_info key (LiteLLM's) a model that reads it has
PART_NEEDS = {"image_url": "supports_vision", "input_audio": "supports_audio_input",
              "file": "supports_pdf_input"}


def part_types(body: Mapping[str, Any]) -> frozenset[str]:
    """The types of the content parts of a chat request, in any turn."""
    types = set()
    for msg in body.get("messages") or ():
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if isinstance(content, list):
            types.update(p["type"] for p in content if isinstance(p, Mapping) and isinstance(p.get("type"), str))
    return frozenset(types)


def features_needed(body: Mapping[str, Any]) -> frozenset[str]:
    """What a chat request needs a model to read, as LiteLLM's ``model_info`` keys name it: image,
    audio or file parts in any turn (the whole conversation is sent), ``tools`` (or the older
    ``functions``)."""
    needs = {PART_NEEDS[kind] for kind in part_types(body) if kind in PART_NEEDS}
    if body.get("tools") or body.get("functions"):
        needs.add("supports_function_calling")
    return frozenset(needs)


def supports(d: Deployment, feature: str) -> bool | None:
    """False for the parts litellm's translation for the model's provider leaves out
    (``Deployment.dropped_parts``), whatever the file says: the model is never sent them; else
    ``model_info.<feature>`` as the file says it; unset, a local server reads images only with a
    multimodal ``--chat_format`` and its ``--clip_model_path`` (``LocalServerConfig.vision``);
    otherwise None (unknown)."""
    if any(PART_NEEDS.get(kind) == feature for kind in d.dropped_parts):
        return False
    said = getattr(d.info, feature)
    if said is not None:
        return said
    if feature == "supports_vision" and d.info.local_server is not None:
        return d.info.local_server.vision
    return None


def able(pool: list[Deployment], needs: frozenset[str]) -> list[Deployment]:
    """The models of ``pool`` not known to be unable to read the request (``features_needed``);
    when none is left, ``pool`` (the best-ranked one says why it cannot, as it would have)."""
    fit = [d for d in pool if all(supports(d, f) is not False for f in needs)]
    return fit or pool


def candidates(models: Iterable[Deployment], allow: Sequence[str] | None,
               cooling: Callable[[str], bool], needed_tokens: tuple[int, int] = (0, 0),
               needs: frozenset[str] = frozenset()) -> list[Deployment]:
    """Routable models the request allows, able to read it (``able``), with room for its
    ``needed_tokens`` (``with_room``), cooled-down ones left out unless nothing else is left."""
    models = list(models)
    pool = [d for d in models if d.routable]
    if allow is not None:
        known = {d.name for d in models}
        allowed = set(allow)
        pool = [d for d in pool if d.name in allowed]
        if not pool:
            why = "; ".join(f"{d.name}: " + (f"unavailable ({d.unavailable})" if d.unavailable
                                              else "no capability profile yet")
                            for d in models if d.name in allowed) or "none of them is configured"
            raise RequestError(f"satroute.models {sorted(allowed)} leaves no routable model ({why}); "
                               f"configured: {sorted(known)}", param="satroute.models", code="no_candidates")
    if not pool:
        down = [d for d in models if d.unavailable]
        why = "; ".join(f"{d.name}: {d.unavailable}" for d in down)
        err = ServiceUnavailable("no model is routable: none has a capability profile and "
                                 "working credentials" + (f" ({why})" if why else ""),
                                 code="no_candidates")
        if any(coming_back(d.unavailable) for d in down):  # a local server on its way back
            err.retry_after = STARTING_RETRY_AFTER_S
        raise err
    pool = with_room(able(pool, needs), needed_tokens)
    warm = [d for d in pool if not cooling(d.name)]
    return warm or pool


def shortlist(pool: list[Deployment], limit: int,
              means: Callable[[Mapping[str, Any]], Mapping[str, float]]) -> tuple[list[Deployment], list[Deployment]]:
    """The candidates the scorer reads (at most ``limit``, 0: all; those with the best profile
    ``means``, in config order) and the others, best mean first (ties in config order)."""
    if not limit or len(pool) <= limit:
        return pool, []
    mean = means({d.name: d.profile for d in pool})
    order = sorted(range(len(pool)), key=lambda i: (-mean[pool[i].name], i))
    kept = set(order[:limit])
    return [d for i, d in enumerate(pool) if i in kept], [pool[i] for i in order[limit:]]


def rank(scores: Mapping[str, float], order: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """Candidates best first; a missing or NaN score ranks last; ties keep config order."""
    def clean(name: str) -> float:
        s = scores.get(name)
        return -math.inf if s is None or math.isnan(s) else float(s)

    keyed = [(clean(n), i, n) for i, n in enumerate(order)]
    keyed.sort(key=lambda t: (-t[0], t[1]))
    return tuple((n, s) for s, _, n in keyed)
