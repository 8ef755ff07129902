"""Built-in post-training data from the running Python: deterministic, split by module, answers from the docs."""

from __future__ import annotations

import ast
import inspect
import random
import re
import sys
import sysconfig
from pathlib import Path

import pytest

from flopwise.errors import FlopwiseError
from flopwise.posttrain import builtin_data
from flopwise.posttrain.builtin_data import builtin_instructions, builtin_preferences
from flopwise.posttrain.conversations import Conversation

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TOPICS = "built-in:pydoc_data.topics:"


@pytest.fixture(scope="module")
def split0() -> tuple[list[Conversation], list[Conversation]]:
    return builtin_instructions(0)


def question(conversation: Conversation) -> str:
    return conversation.messages[-2].content


def answer(conversation: Conversation) -> str:
    return conversation.messages[-1].content


def package(source: str) -> str:
    """'built-in:json.decoder' -> 'json'; a help topic is its own unit."""
    return source if source.startswith(TOPICS) else source.removeprefix("built-in:").split(".")[0]


def docstring_paragraph(relative: str, *names: str) -> str:
    """The first paragraph of a definition's docstring, recomputed from the source without flopwise."""
    node: ast.AST = ast.parse((STDLIB / relative).read_text(encoding="utf-8"))
    for name in names:
        node = next(child for child in node.body if getattr(child, "name", None) == name)
    return re.split(r"\n[ \t]*\n", inspect.cleandoc(ast.get_docstring(node, clean=False)).strip())[0]


def test_the_same_seed_gives_the_same_data_and_another_seed_other_data(split0):
    assert builtin_instructions(0) == split0
    other = builtin_instructions(1)
    assert {c.source for c in other[1]} != {c.source for c in split0[1]}
    assert [question(c) for c in other[0]] != [question(c) for c in split0[0]]
    assert builtin_preferences(0) == builtin_preferences(0) != builtin_preferences(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_module_or_topic_is_on_both_sides_of_the_split(seed):
    train, held_out = builtin_instructions(seed)
    assert {package(c.source) for c in train}.isdisjoint(package(c.source) for c in held_out)
    assert any(c.source.startswith(TOPICS) for c in held_out) and any(c.source.startswith(TOPICS) for c in train)
    assert any(not c.source.startswith(TOPICS) for c in held_out)


def test_counts_are_a_few_thousand_with_about_a_tenth_held_out(split0):
    train, held_out = split0
    assert len(train) >= 1500 and len(held_out) >= 50
    assert 0.02 < len(held_out) / (len(train) + len(held_out)) < 0.25


def test_answers_are_the_first_paragraph_of_the_docstring(split0):
    by_question = {re.search(r"`([^`]+)`", question(c)).group(1): answer(c)
                   for c in split0[0] + split0[1] if not c.source.startswith(TOPICS)}
    assert by_question["json.dumps"] == docstring_paragraph("json/__init__.py", "dumps")
    assert by_question["json.loads"] == docstring_paragraph("json/__init__.py", "loads")
    assert by_question["textwrap.dedent"] == docstring_paragraph("textwrap.py", "dedent")
    method = docstring_paragraph("json/encoder.py", "JSONEncoder", "encode")
    assert by_question["json.encoder.JSONEncoder.encode"] == method
    short = docstring_paragraph("json/decoder.py", "JSONDecoder")
    assert (len(short) >= builtin_data.MIN_ANSWER_CHARS) == ("json.decoder.JSONDecoder" in by_question)
    assert not any(name.split(".")[-1].startswith("_") for name in by_question)


def test_questions_follow_the_templates_and_help_topics_are_answered_by_their_opening(split0):
    conversations = split0[0] + split0[1]
    dumps = next(c for c in conversations if "`json.dumps`" in question(c))
    assert question(dumps) in [template.format("json.dumps") for template in builtin_data.QUESTIONS["function"]]
    from pydoc_data.topics import topics

    with_topic = next(c for c in conversations if c.source == TOPICS + "with")
    assert "the `with` statement" in question(with_topic)
    assert answer(with_topic).startswith(topics["with"].split("\n\n")[1].strip())


def test_conversations_are_well_formed_with_some_system_prompts(split0):
    conversations = split0[0] + split0[1]
    for conversation in conversations:
        roles = [m.role for m in conversation.messages]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        assert builtin_data.MIN_ANSWER_CHARS <= len(answer(conversation)) <= builtin_data.MAX_ANSWER_CHARS
    share = sum(len(c.messages) == 3 for c in conversations) / len(conversations)
    assert 0.1 < share < 0.4


def test_preferences_use_the_same_questions_and_split_with_another_answer_rejected(split0):
    for conversations, pairs in zip(split0, builtin_preferences(0)):
        assert len(pairs) == len(conversations)
        for conversation, pair in zip(conversations, pairs):
            assert pair.prompt == conversation.messages[:-1] and pair.chosen == answer(conversation)
            assert pair.source == conversation.source and pair.rejected != pair.chosen
        answers = {answer(c) for c in conversations}
        assert all(pair.rejected in answers for pair in pairs)
        by_answer = {answer(c): c.source for c in conversations}
        other_unit = sum(package(by_answer[pair.rejected]) != package(pair.source) for pair in pairs)
        assert other_unit / len(pairs) > 0.9


def test_rejected_replies_are_about_as_long_as_the_chosen_ones(split0):
    """Length must not give the answer away: most rejected replies are within 25% of the chosen one's length,
    where a random rival of the same kind is within it for far fewer."""
    pairs = builtin_preferences(0)[0]
    close = sum(0.8 <= len(p.rejected) / len(p.chosen) <= 1.25 for p in pairs) / len(pairs)
    answers = [p.chosen for p in pairs]
    shuffled = random.Random(0).sample(answers, len(answers))
    by_chance = sum(0.8 <= len(b) / len(a) <= 1.25 for a, b in zip(answers, shuffled)) / len(answers)
    assert close > 0.8 and by_chance < 0.5


def test_building_imports_no_module_with_side_effects():
    builtin_data._entries.cache_clear()
    builtin_instructions(5)
    builtin_preferences(5)
    assert not {"antigravity", "this", "tkinter", "idlelib", "turtle"} & set(sys.modules)


def test_a_python_without_library_sources_says_so_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin_data.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    builtin_data._entries.cache_clear()
    try:
        with pytest.raises(FlopwiseError, match=r"^no standard library sources under '.*': the built-in [^\n]*$"):
            builtin_instructions(0)
    finally:
        builtin_data._entries.cache_clear()
