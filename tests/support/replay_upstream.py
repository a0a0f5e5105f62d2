"""An OpenAI-compatible server on 127.0.0.1 that answers aptitude questions exactly as a real model did.

For a question of the routing data (``../shared/data/mmlu_pro``) asked of model M, the answer is M's
recorded output: its raw generation from ``generations.jsonl.gz`` where there is one, else a short
text ending "The answer is (X)." with M's recorded ``pred`` from ``predictions.csv.gz`` (a text with
no answer where the recorded pred is empty). The question is recognised from the prompt itself: the
text after "Question:" up to "Options:" (with the lettered options to tell the dataset's duplicate
questions apart), else any known question text found in the last user message. Anything else gets a
plain "reply from M". The request's ``model`` is M (the upstream model id in providers.yaml).
The data set repeats some questions word for word (options included); such a prompt is taken as the
first of its copies that is in ``prefer`` (the suite being asked) and not yet answered for M. Copies
sit in the same subject, so a per-task profile does not depend on which copy got which answer.

It records what it received and what it answered (per model, question ids in order), can add a fixed
latency, and can be paused: paused requests wait; ``drop_waiting()`` ends them with a 503 without
answering (what a model whose client died mid-request costs nothing, and is not counted as answered).

    with ReplayUpstream(data_dir / "mmlu_pro", models=["gemma-7b"]) as up:
        base_url = up.url                        # "http://127.0.0.1:PORT/v1"
        up.answered["gemma-7b"]                  # question ids answered, in order

As a process: ``cd tests && python -m support.replay_upstream --data DIR --models M --latency 0.5``
(prints its base URL).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from support.proxy_server import ProxyServer

_QUESTION = re.compile(r"Question:\s*(.*?)\s*\nOptions:\s*\n(.*?)(?:\n\s*Answer:|\Z)", re.S)
_OPTION = re.compile(r"^[A-J]\.\s?(.*)$")


def _norm(text: str) -> str:
    return " ".join(text.split())


class Replay:
    """The recorded answers of some models to the questions of one data folder (no server)."""

    def __init__(self, folder: str | Path, models: Iterable[str], prefer: Iterable[str] = ()):
        folder = Path(folder)
        self.models = set(models)
        self.prefer = set(prefer)
        self.by_text: dict[str, list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
        self.key_of: dict[str, tuple[str, tuple[str, ...]]] = {}
        with gzip.open(folder / "prompts.jsonl.gz", "rt", encoding="utf-8") as fh:
            for line in fh:
                p = json.loads(line)
                opts = tuple(_norm(o) for o in p.get("options") or ())
                self.by_text[_norm(p["question"])].append((p["id"], opts))
                self.key_of[p["id"]] = (_norm(p["question"]), opts)
        self.pred: dict[tuple[str, str], str] = {}
        with gzip.open(folder / "predictions.csv.gz", "rt", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row["model"] in self.models:
                    self.pred[(row["prompt_id"], row["model"])] = row["pred"]
        self.text: dict[tuple[str, str], str] = {}
        generations = folder / "generations.jsonl.gz"
        if generations.exists():
            with gzip.open(generations, "rt", encoding="utf-8") as fh:
                for line in fh:
                    g = json.loads(line)
                    if g["model"] in self.models:
                        self.text[(g["prompt_id"], g["model"])] = g["text"]

    def question_id(self, content: str, done: Iterable[str] = ()) -> str | None:
        """Which question this prompt asks (``done``: copies already answered), or None."""
        m = _QUESTION.search(content)
        if m:
            found = self.by_text.get(_norm(m.group(1)))
            if found:
                if len(found) == 1:
                    return found[0][0]
                opts = tuple(_norm(om.group(1)) for line in m.group(2).splitlines()
                             if (om := _OPTION.match(line.strip())))
                same = [qid for qid, known in found if known == opts] or [found[0][0]]
                done = set(done)
                ranked = sorted(same, key=lambda q: (q not in self.prefer, q in done))
                return ranked[0]
        flat = _norm(content)
        for text, found in self.by_text.items():  # slow path: any other prompt layout
            if len(text) > 40 and text in flat:
                return found[0][0]
        return None

    def prompt_key(self, qid: str) -> tuple[str, tuple[str, ...]]:
        """What a prompt shows of a question: its text and options (copies share it)."""
        return self.key_of[qid]

    def answer(self, qid: str, model: str) -> str:
        text = self.text.get((qid, model))
        if text is not None:
            return text
        pred = self.pred.get((qid, model), "")
        if pred:
            return f"Recorded answer of {model}. The answer is ({pred})."
        return f"Recorded answer of {model}: no option could be chosen."


class ReplayUpstream:
    def __init__(self, folder: str | Path, models: Iterable[str], latency_s: float = 0.0,
                 host: str = "127.0.0.1", prefer: Iterable[str] = ()):
        self.replay = Replay(folder, models, prefer)
        self.latency_s = latency_s
        self.received: dict[str, list[str]] = defaultdict(list)
        self.answered: dict[str, list[str]] = defaultdict(list)
        self.dropped: dict[str, list[str]] = defaultdict(list)
        self._claimed: dict[str, set[str]] = defaultdict(set)
        self.paused = False
        self._epoch = 0  # bumped by drop_waiting()
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                Route("/v1/models", self._models, methods=["GET"])])
        self.server = ProxyServer(app, host)

    @property
    def url(self) -> str:
        return self.server.url

    async def _models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                        "owned_by": "replay"}
                                                       for m in sorted(self.replay.models)]})

    async def _chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        model = body.get("model", "")
        if model not in self.replay.models:
            return JSONResponse({"error": {"message": f"model {model!r} not found", "type":
                                           "invalid_request_error", "param": "model",
                                           "code": "model_not_found"}}, status_code=404)
        users = [m for m in body.get("messages", []) if m.get("role") == "user"]
        content = users[-1].get("content", "") if users else ""
        qid = (self.replay.question_id(content, self._claimed[model])
               if isinstance(content, str) else None)
        if qid:
            self._claimed[model].add(qid)
        key = qid or "other"
        self.received[model].append(key)
        epoch = self._epoch
        while self.paused and epoch == self._epoch:
            await asyncio.sleep(0.005)
        if epoch != self._epoch:
            self.dropped[model].append(key)
            self._claimed[model].discard(key)
            return JSONResponse({"error": {"message": "dropped", "type": "server_error",
                                           "param": None, "code": None}}, status_code=503)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        text = self.replay.answer(qid, model) if qid else f"reply from {model}"
        self.answered[model].append(key)
        return JSONResponse({
            "id": f"chatcmpl-replay-{len(self.answered[model])}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(content) // 4, "completion_tokens": len(text) // 4,
                      "total_tokens": (len(content) + len(text)) // 4}})

    def pause(self) -> None:
        self.paused = True

    def drop_waiting(self) -> None:
        """End every paused request with a 503, unanswered; later requests answer normally."""
        self._epoch += 1
        self.paused = False

    def start(self) -> "ReplayUpstream":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> "ReplayUpstream":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder such as ../shared/data/mmlu_pro")
    parser.add_argument("--models", required=True, help="comma-separated models to replay")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    up = ReplayUpstream(args.data, args.models.split(","), args.latency).start()
    print(up.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        up.stop()


if __name__ == "__main__":
    main()
