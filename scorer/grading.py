"""Grading of multiple-choice answers: the zero-shot chain-of-thought prompt and the answer extractor.

Owns: the prompt a model is asked during its aptitude test (MMLU-Pro's chain-of-thought wording, zero
shot, ending by asking for "the answer is (X)"), the extraction of the answer letter from a model's
free text, and grading that letter against the gold one. Pure functions: no I/O, no model, no
network. It does not know where questions come from, how a model is called, or how results are
stored.

The extractor is deliberately the grading rule of the routing data: every recorded outcome (and so
every profile the scorer learned from) was graded by MMLU-Pro's harness, which reads the first
"answer is (X)" and counts anything else as no answer. An onboarded model must be graded the same
way, or its profile would not be comparable with the zoo's. Measured on the 60,160 recorded
generations of ../shared/data/mmlu_pro (see tests/onboarding/test_grading_data.py), accepting more
("Answer: B", "the answer is **B**", "the closest option is (B)") turns ~1,000 recorded misses into
hits for one model alone. Within that rule it is robust: case and spacing, letters beyond the
question's options ignored, the first valid statement wins (models caught in a repetition loop state
the answer first and repeat noise after it), a letter must end there ("answer is Based on" is not B),
and "\\boxed{X}" is read too. No bare letter is ever taken ("I" and "A" are words).
A reasoning model's ``<think>...</think>`` blocks (or ``<thinking>``, ``<reasoning>``, ``[THINK]``,
``<seed:think>``, ``<|START_THINKING|>``, ``◁think▷``, and the analysis channel of the harmony
format, its special tokens kept or dropped) are its scratchpad, not its answer: closed blocks are
removed before the answer is read (text before a lone ``</think>`` too: some chat templates open
the block in the prompt), and a block never closed that opens what is left (cut off while
reasoning) is no answer.
"""
from __future__ import annotations

import re
from typing import Sequence

LETTERS = "ABCDEFGHIJ"

_SYSTEM = (
    "The following is a multiple choice question about {subject}. Think step by step and then finish "
    'your answer with "the answer is (X)" where X is the correct letter choice.'
)

# "the answer is (X)": MMLU-Pro's own rule (the one every recorded outcome in the routing data was
# graded with), tolerant of the phrase's case and of spacing, and requiring that the letter ends
# there; the letter itself must be a capital, as that rule reads it ("answer is (b)" is none).
_STATED = re.compile(r"(?i:answer\s+is)\s*\(?\s*([A-J])\s*\)?(?![A-Za-z0-9])")
# A LaTeX-minded model may box its letter instead of stating it: \boxed{B}, \boxed{(B)},
# \boxed{\text{B}} (or \textbf, \mathrm, \mathbf) first; then, anywhere in the text only when no box
# holds a letter alone, the letter followed by its option's text, \boxed{B. 42}, \boxed{B) 42} (so
# "\boxed{E. coli} ... \boxed{B}" is B). The letter must end there (\boxed{A+B} is no letter).
_BOX_OPEN = r"\\boxed\{\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{)?\s*"
_BOXED = re.compile(_BOX_OPEN + r"\(?\s*([A-J])\s*\)?\s*\}")
_BOXED_WITH_TEXT = re.compile(_BOX_OPEN + r"\(?\s*([A-J])(?=\s*[.):])")
RULES = (_STATED, _BOXED, _BOXED_WITH_TEXT)
# Scratchpads, as reasoning models open and close them: <think> (DeepSeek-R1, Qwen3), <thinking> and
# <reasoning> (fine-tunes), [THINK] (Magistral), <seed:think> (Seed-OSS), <|START_THINKING|>
# (Command A Reasoning), ◁think▷ (Kimi); and the analysis channel of OpenAI's harmony format (gpt-oss,
# where the server does not split it off), below.
_SCRATCHPADS = (("<think>", "</think>"), ("<thinking>", "</thinking>"), ("<reasoning>", "</reasoning>"),
                ("[THINK]", "[/THINK]"), ("<seed:think>", "</seed:think>"),
                ("<|START_THINKING|>", "<|END_THINKING|>"), ("◁think▷", "◁/think▷"))
_THINK_OPEN = re.compile("|".join(re.escape(o) for o, _ in _SCRATCHPADS), re.IGNORECASE)
_THINK_CLOSE = re.compile("|".join(re.escape(c) for _, c in _SCRATCHPADS), re.IGNORECASE)
_THINK_BLOCK = re.compile("|".join(f"{re.escape(o)}.*?{re.escape(c)}" for o, c in _SCRATCHPADS),
                          re.IGNORECASE | re.DOTALL)
_HARMONY_ANALYSIS = re.compile(r"<\|channel\|>(?:analysis|commentary)<\|message\|>.*?(?:<\|end\|>|(?=<\|start\|>))",
                               re.DOTALL)
_HARMONY_UNENDED = re.compile(r"<\|channel\|>(?:analysis|commentary)<\|message\|>(?:(?!<\|end\|>|<\|start\|>).)*\Z",
                              re.DOTALL)  # cut off while reasoning
_HARMONY_TAGS = re.compile(r"<\|(?:start|end|channel|message|return)\|>(?:assistant|final)?")
# harmony from a server that drops special tokens from its text: "analysis...assistantfinal..."
_HARMONY_BARE = re.compile(r"\s*(?:analysis|commentary)(?=[A-Za-z])")
_HARMONY_BARE_FINAL = "assistantfinal"


def subject_name(category: str) -> str:
    """'ori_mmlu-high_school_biology' or 'high_school_biology' -> 'high school biology'."""
    return category.rsplit("-", 1)[-1].replace("_", " ").strip() or "general knowledge"


def build_messages(question: str, options: Sequence[str], subject: str = "") -> list[dict]:
    """The zero-shot chain-of-thought prompt, as OpenAI chat messages (a system and a user message)."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"a question needs 2 to {len(LETTERS)} options, got {len(options)}")
    lines = [f"Question: {question.strip()}", "Options:"]
    lines += [f"{LETTERS[i]}. {str(opt).strip()}" for i, opt in enumerate(options)]
    lines.append("Answer: Let's think step by step.")
    return [
        {"role": "system", "content": _SYSTEM.format(subject=subject_name(subject))},
        {"role": "user", "content": "\n".join(lines)},
    ]


def _first_valid(pattern: re.Pattern[str], text: str, valid: str) -> str | None:
    for match in pattern.finditer(text):
        letter = match.group(1)
        if letter in valid:
            return letter
    return None


def strip_reasoning(text: str) -> str | None:
    """``text`` without its scratchpads (the blocks of ``_SCRATCHPADS``, harmony's analysis and
    commentary channels); None when it is cut off inside one.

    Text up to a closing tag that no opening tag opened is reasoning too (templates that open the
    block in the prompt, e.g. DeepSeek-R1's; and a block nested in another). An opening tag never
    closed is a cut-off only where it opens what is left: one further on is a mention ("the
    ``<reasoning>`` element"), or a block begun after the answer was stated, which stays first.
    """
    if "<|channel|>" in text:  # harmony: the final channel is the answer; an analysis never ended is none
        if _HARMONY_UNENDED.search(text):
            return None
        text = _HARMONY_TAGS.sub(" ", _HARMONY_ANALYSIS.sub(" ", text))
    elif _HARMONY_BARE.match(text):  # the same, its tokens dropped: no final channel is a cut-off
        if _HARMONY_BARE_FINAL not in text:
            return None
        text = text[text.rindex(_HARMONY_BARE_FINAL) + len(_HARMONY_BARE_FINAL):]
    while True:
        close, open_ = _THINK_CLOSE.search(text), _THINK_OPEN.search(text)
        if close is not None and (open_ is None or open_.start() > close.start()):
            text = text[close.end():]
            continue
        shorter = _THINK_BLOCK.sub(" ", text)
        if shorter == text:
            break
        text = shorter
    open_ = _THINK_OPEN.search(text)
    if open_ is not None and not text[:open_.start()].strip():
        return None  # cut off while reasoning: whatever it said there is not its answer
    return text


def reasoning_conclusion(reasoning: str, n_options: int = len(LETTERS)) -> str:
    """The part of a model's reasoning, returned apart from its answer, that states its answer:
    from its last statement of a letter on (a trace tries letters before it settles: "the answer
    is B? Wait, no..."), by the first of ``RULES`` that finds one; so that ``extract_answer``
    reads the conclusion in it, now and when stored answers are graded again. The reasoning's
    tags (scratchpads', harmony's) are taken out, what they enclose kept: it is all reasoning.
    The whole of it, so tidied, when it states no letter."""
    text = _THINK_CLOSE.sub(" ", _THINK_OPEN.sub(" ", reasoning))
    text = _HARMONY_BARE.sub(" ", _HARMONY_TAGS.sub(" ", text).replace(_HARMONY_BARE_FINAL, " ")).strip()
    valid = LETTERS[: max(1, min(n_options, len(LETTERS)))]
    for pattern in RULES:
        starts = [m.start() for m in pattern.finditer(text) if m.group(1) in valid]
        if starts:
            return text[starts[-1]:]
    return text


def extract_answer(text: str | None, n_options: int = len(LETTERS)) -> str | None:
    """The answer letter a model's free text commits to, or None when it states none.

    Only letters within the first ``n_options`` count: a 4-option question has no answer "G".
    Scratchpads (``strip_reasoning``) are not read; an unclosed one is no answer.
    """
    if not text:
        return None
    text = strip_reasoning(text)
    if not text:
        return None
    valid = LETTERS[: max(1, min(n_options, len(LETTERS)))]
    for pattern in RULES:
        letter = _first_valid(pattern, text, valid)
        if letter is not None:
            return letter
    return None


def grade(text: str | None, gold: str, n_options: int = len(LETTERS)) -> bool:
    """True when the letter extracted from ``text`` is the gold letter; no answer grades wrong."""
    return extract_answer(text, n_options) == gold.strip().upper()
