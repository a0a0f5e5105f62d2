"""The aptitude prompt and the answer extractor (pure; no data needed)."""
from __future__ import annotations

import pytest

from scorer.grading import build_messages, extract_answer, grade, subject_name


def test_prompt_is_zero_shot_cot_and_asks_for_the_answer_is_x():
    msgs = build_messages("What is 2+2?", ["3", "4", "5"], "ori_mmlu-elementary_mathematics")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "elementary mathematics" in msgs[0]["content"]
    assert 'the answer is (X)' in msgs[0]["content"]
    user = msgs[1]["content"]
    assert user.startswith("Question: What is 2+2?\nOptions:\nA. 3\nB. 4\nC. 5\n")
    assert user.endswith("Answer: Let's think step by step.")


def test_prompt_rejects_bad_option_counts():
    with pytest.raises(ValueError):
        build_messages("q", ["only one"])
    with pytest.raises(ValueError):
        build_messages("q", [str(i) for i in range(11)])


@pytest.mark.parametrize("text,letter", [
    ("Let's see. 2+2=4. The answer is (B).", "B"),
    ("the answer is B", "B"),
    ("The Answer Is ( C )", "C"),
    ("answer is\n(D) because", "D"),
    ("The answer is (J).", "J"),
    ("Thus \\boxed{E}", "E"),
    ("$\\boxed{\\textbf{B}}$", "B"),
    ("The correct choice is $\\boxed{\\mathrm{B}}$", "B"),
    ("\\boxed{B. 42}", "B"),
    ("\\boxed{B) 42}", "B"),
    ("\\boxed{\\text{B. the mitochondria}}", "B"),
    ("\\boxed{(C)}", "C"),
    ("The bacterium is \\boxed{E. coli}, so option (B): \\boxed{B}", "B"),  # a box holding a letter alone wins
    ("... the answer is (A). The answer is (C). The answer is (C).", "A"),  # first statement wins
])
def test_extracts_stated_letters(text, letter):
    assert extract_answer(text) == letter


@pytest.mark.parametrize("text", [
    "", None, "I think A is wrong and so is B.", "The answer is Based on the options",
    "Answer: none of these", "the answer is (a)",  # lower-case letters are words, not choices
    "The answer is not among the choices.",
    "\\boxed{A+B}", "\\boxed{Based on}", "\\boxed{42}",  # no letter that ends there
])
def test_no_statement_no_answer(text):
    assert extract_answer(text) is None


def test_letters_beyond_the_options_are_ignored():
    assert extract_answer("The answer is (G). Sorry, the answer is (B).", n_options=4) == "B"
    assert extract_answer("The answer is (G).", n_options=4) is None
    assert extract_answer("The answer is (G).", n_options=10) == "G"


def test_grade():
    assert grade("so the answer is (C).", "C")
    assert not grade("so the answer is (C).", "D")
    assert not grade("no idea", "A")
    assert grade("the answer is (c)", "C") is False


def test_subject_name():
    assert subject_name("ori_mmlu-high_school_biology") == "high school biology"
    assert subject_name("law") == "law"
    assert subject_name("") == "general knowledge"


@pytest.mark.parametrize("text,letter", [
    ("<think>Maybe the answer is (A)... no wait, it's C.</think>\nThe answer is (C).", "C"),
    ("<think>so the answer is (A)? 2+2=4</think> The answer is (C).", "C"),
    ("<THINK>the answer is (A)</THINK><think>or is it (B)</think>The answer is (D).", "D"),
    ("the answer is (A) maybe</think>\nThe answer is (B).", "B"),  # template opened the block
    ("<think>the answer is (A), let me double-check the", None),  # cut off while reasoning
    # a block begun after the answer was stated, then cut off: the stated answer is the first
    ("<think>the answer is (A)</think>The answer is (B). <think>hmm, the answer is (C)", "B"),
    ("<think>the answer is (A)</think> I cannot tell.", None),
    ("<thinking>the answer is (A)</thinking>\nThe answer is (B).", "B"),
    ("<reasoning>the answer is (A)</reasoning>\nThe answer is (B).", "B"),
    ("<thinking>the answer is (A), let me", None),
    ("<|channel|>analysis<|message|>Maybe the answer is (A). No.<|end|><|start|>assistant<|channel|>final"
     "<|message|>The answer is (B).<|return|>", "B"),
    ("<|channel|>analysis<|message|>Maybe the answer is (A). Let me check", None),
    ("<|start|>assistant<|channel|>final<|message|>The answer is (C).", "C"),
])
def test_reasoning_blocks_are_not_the_answer(text, letter):
    assert extract_answer(text, 4) == letter


@pytest.mark.parametrize("text,letter", [
    # gpt-oss through a server that drops harmony's special tokens from the text
    ("analysisThe question asks... maybe the answer is (A)? No, 2+2=4.assistantfinalThe answer is (C).", "C"),
    ("commentaryLooking it up: the answer is (A)?assistantfinalThe answer is (D).", "D"),
    ("analysisWe need 2+2. Maybe the answer is (A)? Let me", None),  # cut off in its analysis
    ("Analysis: the answer is (B).", "B"),  # an answer that begins with the word is no channel
    ("analysis: the answer is (B).", "B"),
    ("[THINK]maybe the answer is (A)?[/THINK]The answer is (C).", "C"),  # Magistral
    ("<seed:think>maybe the answer is (A)?</seed:think>The answer is (C).", "C"),  # Seed-OSS
    ("<|START_THINKING|>maybe the answer is (A)?<|END_THINKING|>The answer is (C).", "C"),  # Command A
    ("◁think▷maybe the answer is (A)?◁/think▷The answer is (C).", "C"),  # Kimi
    ("[THINK]the answer is (A), let me", None),  # cut off while reasoning
    # nested blocks: what is left of the outer one is reasoning too
    ("<think>first <think>the answer is (A)?</think> so the answer is (B)?</think>The answer is (C).", "C"),
    # a tag mentioned in a finished answer is no scratchpad left open
    ("The `<reasoning>` element is not valid HTML, so the answer is (C).", "C"),
    ("<think>2+2=4</think>As I noted in my <think> block, the answer is (D).", "D"),
])
def test_the_scratchpads_of_other_reasoning_models_are_not_the_answer(text, letter):
    """Read as the answer, a scratchpad's tentative letter became the graded one: every answer of
    a model that reasons in these formats, right after its reasoning, was graded on its first guess."""
    assert extract_answer(text, 4) == letter
