"""Routing policy: the scored instruction, candidate selection, ranking."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from proxy.errors import RequestError, ServiceUnavailable
from proxy.providers import parse
from proxy.routing import approx_tokens, candidates, instruction_text, rank


def test_last_user_turn_plus_context_that_fits():
    msgs = [{"role": "system", "content": "SYSTEM PROMPT"},
            {"role": "user", "content": "first question " * 10},
            {"role": "assistant", "content": "first answer"},
            {"role": "tool", "tool_call_id": "t", "content": "TOOL OUTPUT"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]},
            {"role": "user", "content": [{"type": "text", "text": "now this"},
                                         {"type": "image_url", "image_url": {"url": "u"}},
                                         {"type": "text", "text": "and that"}]}]
    text = instruction_text(msgs, budget_tokens=512)
    # the request first (the scorer reads the start), then the context, newest first
    assert text == "now this\nand that\n\nfirst answer\n\n" + "first question " * 10
    assert "SYSTEM" not in text and "TOOL OUTPUT" not in text
    small = instruction_text(msgs, budget_tokens=approx_tokens("now this\nand that") + 5)
    assert small == "now this\nand that\n\nfirst answer"


def test_the_request_opens_the_instruction_however_long_the_chat_before_it():
    """The served scorer reads the first 64 tokens of the instruction through phi: a long earlier
    answer must not push the question being routed out of them."""
    msgs = [{"role": "user", "content": "Tell me about Rome."},
            {"role": "assistant", "content": "The Roman Empire began in 27 BC. " * 60},
            {"role": "user", "content": "Write a fibonacci function in Rust."}]
    assert instruction_text(msgs, 512).startswith("Write a fibonacci function in Rust.")


def test_a_long_answer_is_skipped_not_the_end_of_the_context():
    """"and in French?" after a long answer: the question asked before it is still read."""
    msgs = [{"role": "user", "content": "Explain the causes of World War I."},
            {"role": "assistant", "content": "The causes were many. " * 120},
            {"role": "user", "content": "and in French?"}]
    assert instruction_text(msgs, 512) == "and in French?\n\nExplain the causes of World War I."


def _retrieval_turn(question: str) -> str:
    """A user turn as Open WebUI's retrieval template writes it: its instructions, the documents
    found, and the question last, in <user_query> tags (wording ours)."""
    return ("### Task:\nAnswer the query with the documents below, citing them by id.\n"
            "### Guidelines:\n- Say so when the documents do not hold the answer.\n" * 20
            + "<context>\n<source id=\"1\">" + "Quarterly revenue rose by four percent. " * 200
            + "</source>\n</context>\n<user_query>\n" + question + "\n</user_query>\n")


def test_a_retrieval_template_s_question_is_what_is_scored():
    """The template's start is the same for every such request: read from it, every question asked
    over documents was scored alike (the question came thousands of tokens later)."""
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": _retrieval_turn("Prove that the square root of 2 is irrational.")}]
    assert instruction_text(msgs, 512) == "Prove that the square root of 2 is irrational.\n\nHi!\n\nHello"
    for whole in ("<context>x</context><user_query>  </user_query>",  # no question in it
                  "<user_query>what?</user_query>",  # no documents before it: not the template
                  "<context>x</context><user_query>what?</user_query> and then more words",  # not last
                  "Why is my template wrong?\n<context>{{CONTEXT}}</context>\n<user_query>{{QUERY}}</user_query>"):
        assert instruction_text([{"role": "user", "content": whole}], 512) == whole[:2048], whole


def _template_before_the_turn(question: str, quoted: bool) -> str:
    """A user turn as Open WebUI's middleware writes it now: its retrieval template (instructions,
    the documents found in <context>, in older templates the query again in <user_query> tags) put
    before the user's own turn (wording ours)."""
    template = ("### Task:\nRespond to the user query using the provided context.\n" * 20
                + "<context>\n<source id=\"1\">" + "Quarterly revenue rose by four percent. " * 200
                + "</source>\n</context>\n")
    if quoted:
        template += "<user_query>\n" + question + "\n</user_query>\n"
    return template + "\n" + question


@pytest.mark.parametrize("quoted", [False, True])
def test_a_question_after_a_retrieval_template_put_before_it_is_what_is_scored(quoted):
    """Open WebUI puts its template before the user's turn (``append=False``), and its default
    template no longer quotes the query: the turn ends with the user's words after </context>.
    Read from its start, every question asked over documents or web search was scored alike."""
    question = "Prove that the square root of 2 is irrational."
    msgs = [{"role": "user", "content": _template_before_the_turn(question, quoted)}]
    assert instruction_text(msgs, 512) == question
    for whole in ("<context>{{CONTEXT}}</context>\nWhy is my template wrong?",  # the placeholder
                  "<context>some documents</context>",  # nothing after them
                  "<context>x</context><user_query>what?</user_query>\nsomething else"):  # not the same
        assert instruction_text([{"role": "user", "content": whole}], 512) == whole, whole


def test_the_words_a_user_typed_are_read_before_the_files_attached_to_them():
    """Continue sends the files and code a user attaches (@file, a selection) as text parts before
    what the user typed: the typed question is what is scored first."""
    attached = {"type": "text", "text": "```src/app.py\n" + "def handler(request):\n    pass\n" * 200 + "```\n"}
    typed = {"type": "text", "text": "Why does this handler never return a response?"}
    msgs = [{"role": "user", "content": [attached, typed]}]
    assert instruction_text(msgs, 512).startswith("Why does this handler never return a response?\n```src")


def test_an_agent_s_task_is_read_before_the_environment_it_sends_after_it():
    """Cline (and Roo Code, Kilo Code) sends the task, then its <environment_details> (open tabs,
    the time, a file listing) as the last part: read last part first, the listing filled the
    budget and the task was never scored."""
    task = {"type": "text", "text": "<task>\nProve that the square root of 2 is irrational.\n</task>"}
    details = {"type": "text", "text": "<environment_details>\n# VSCode Visible Files\n"
                                       + "src/module_%d.py\n" * 400 + "</environment_details>"}
    text = instruction_text([{"role": "user", "content": [task, details]}], 512)
    assert text.startswith("<task>\nProve that the square root of 2 is irrational.")


def test_reading_a_turn_for_its_question_takes_linear_time():
    """A regex on the tags backtracked: an unclosed tag and 4,000 spaces held the event loop (and
    every other request) for 27 s."""
    import time

    for text in ("<user_query>" + " " * 200_000, "<user_query>" * 50_000, "</user_query>" * 50_000,
                 "<context>" + "<user_query> " * 50_000 + "</user_query>"):
        started = time.perf_counter()
        instruction_text([{"role": "user", "content": text}], 512)
        assert time.perf_counter() - started < 0.05, text[:40]


def test_whitespace_is_not_text():
    msgs = [{"role": "system", "content": "Translate to French."},
            {"role": "user", "content": "Good morning"},
            {"role": "assistant", "content": "  \n"},
            {"role": "user", "content": "  "}]
    assert instruction_text(msgs, 512) == "Good morning"
    assert instruction_text(msgs[:1] + [{"role": "user", "content": " "}], 512) == "Translate to French."


def test_long_last_turn_is_cut_to_budget_and_no_user_falls_back():
    assert len(instruction_text([{"role": "user", "content": "x" * 10000}], 100)) == 400
    assert instruction_text([{"role": "system", "content": "only system"}], 100) == "only system"
    assert instruction_text([{"role": "assistant", "content": None}], 100) == ""


def test_rank_orders_by_score_with_stable_ties_and_bad_scores_last():
    assert rank({"a": 0.1, "b": 0.9, "c": 0.1}, ["a", "b", "c"]) == (
        ("b", 0.9), ("a", 0.1), ("c", 0.1))
    ranked = rank({"a": math.nan, "b": 0.0}, ["a", "b", "c"])
    assert [n for n, _ in ranked] == ["b", "a", "c"]


CONF = """
model_list:
  - {model_name: a, litellm_params: {model: openai/a}}
  - {model_name: b, litellm_params: {model: openai/b}}
  - {model_name: c, litellm_params: {model: openai/c}}
"""


def models(profiled=("a", "b", "c")):
    profiles = {n: {"t": 0.5} for n in profiled}
    lookup = lambda d: profiles.get(d.name)  # noqa: E731
    return list(parse(CONF, __import__("pathlib").Path("p.yaml"), {}, lookup).models.values())


def test_candidates_respect_profiles_allow_list_and_cooldown():
    names = lambda ds: [d.name for d in ds]  # noqa: E731
    assert names(candidates(models(("a", "c")), None, lambda n: False)) == ["a", "c"]
    assert names(candidates(models(), ["c", "b"], lambda n: False)) == ["b", "c"]
    assert names(candidates(models(), None, lambda n: n == "a")) == ["b", "c"]
    # everything cooling: better to try than to refuse
    assert names(candidates(models(), None, lambda n: True)) == ["a", "b", "c"]
    with pytest.raises(RequestError) as refused:
        candidates(models(("a",)), ["b", "zz"], lambda n: False)
    assert "(b: no capability profile yet)" in refused.value.message  # why, per model named
    gone = [replace(d, unavailable="litellm_params.api_key references unset environment variable K")
            if d.name == "c" else d for d in models()]
    with pytest.raises(RequestError) as refused:
        candidates(gone, ["c"], lambda n: False)
    assert "c: unavailable (litellm_params.api_key references unset environment variable K)" in refused.value.message
    with pytest.raises(ServiceUnavailable):
        candidates(models(()), None, lambda n: False)


@pytest.mark.parametrize("stream_timeout, streamed", [(60, 60.0), (None, 900.0), (0, 900.0), ("0", 900.0),
                                                      ("abc", 900.0), ("45", 45.0), (float("inf"), 900.0)])
def test_a_stream_timeout_that_is_no_positive_number_is_not_given(stream_timeout, streamed):
    """As LiteLLM reads it: a null or 0 stream_timeout copied from its config left a slow model's
    streams at the router's 300 s where its own timeout says 900."""
    from proxy.dispatch import attempt_timeout

    snap = parse("model_list:\n  - {model_name: m, litellm_params: {model: openai/x, timeout: 900}}\n",
                 __import__("pathlib").Path("p.yaml"), {}, lambda d: None)
    d = snap.models["m"]
    d = replace(d, params={**d.params, "stream_timeout": stream_timeout})
    assert attempt_timeout(d, snap.router, stream=True) == streamed
    assert attempt_timeout(d, snap.router, stream=False) == 900.0
