"""Built-in tasks from held-out text: deterministic, answers taken from the text, distractors from elsewhere,
one-line errors when the text gives no example."""

from __future__ import annotations

import ast
import random
import re
import string

import pytest

from flopwise.data.config import DataSection
from flopwise.data.pipeline import prepare_data
from flopwise.errors import FlopwiseError
from flopwise.evaluate.tasks.builtin import (
    BUILTIN_TASKS,
    DEFAULT_CORPUS_ONLY,
    HeldoutText,
    build_builtin,
    builtin_names,
)
from flopwise.evaluate.tasks.spec import Task

VERBS = ["build", "parse", "merge", "split", "count", "scale", "check", "render"]
NOUNS = ["header", "record", "window", "buffer", "column", "packet", "ledger", "cursor", "matrix", "bundle"]
WORD = r"[A-Za-z_][A-Za-z0-9_]*"


def module(index: int) -> str:
    """A small Python module: six documented functions, each naming a local variable twice (a rare word)."""
    parts = [f'"""Module number {index}."""\n\nimport os\n']
    for k in range(6):
        verb, noun = VERBS[(index + k) % len(VERBS)], NOUNS[(index * 3 + k) % len(NOUNS)]
        local = f"{noun}{index}x{k}"
        parts.append(f'def {verb}_{noun}_{index}{k}(value, limit={k}):\n'
                     f'    """{verb.capitalize()} the {noun} of item {index}{k}. It is step {k}.\n\n'
                     f'    Nothing else happens in module {index}.\n    """\n'
                     f'    {local} = value * limit + {index}\n'
                     f'    return {local} - os.getpid() * {k}\n')
    return "\n\n".join(parts)


def prose(index: int) -> str:
    """Lines of English that differ from one document to the next, and a rare name said twice."""
    return "\n".join(f"Paragraph {index}.{k} tells how the {NOUNS[(index + k) % len(NOUNS)]} keeps its "
                     f"{VERBS[(index * k) % len(VERBS)]}ed order {k} times." for k in range(12)) + \
        f"\nIts keeper is called Warden{index}; Warden{index} never sleeps.\n"


CODE = HeldoutText(tuple(("code", module(i)) for i in range(8)) + tuple(("prose", prose(i)) for i in range(4)),
                   default_corpus=True)
PROSE = HeldoutText(tuple(("prose", prose(i)) for i in range(6)), default_corpus=False)


def occurrences(word: str, text: str) -> int:
    return len(re.findall(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", text))


def document_of(heldout: HeldoutText, piece: str) -> int:
    """The one document holding ``piece``."""
    found = [index for index, (_, text) in enumerate(heldout.documents) if piece in text]
    assert len(found) == 1, (piece, found)
    return found[0]


def docstrings(heldout: HeldoutText) -> dict[str, str]:
    """Every function's docstring by name, parsed independently of the task code."""
    result = {}
    for domain, text in heldout.documents:
        if domain == "code":
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
                    result[node.name] = ast.get_docstring(node, clean=False)
    return result


def check_shape(task: Task, name: str) -> None:
    assert (task.name, task.kind, task.source) == (name, "choice", "built-in")
    for example in task.examples:
        assert len(example.choices) == 4 and 0 <= example.answer < 4
        stripped = [c.strip() for c in example.choices]
        assert all(a == b or not a.startswith(b) for a in stripped for b in stripped), example.choices
        assert len(example.context) <= 400


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_tasks_are_deterministic_per_seed_and_a_larger_count_only_adds_examples(name):
    first, again = build_builtin(name, CODE, seed=3, count=20), build_builtin(name, CODE, seed=3, count=20)
    assert first == again and len(first.examples) == 20
    check_shape(first, name)
    assert build_builtin(name, CODE, seed=4, count=20).examples != first.examples
    assert build_builtin(name, CODE, seed=3, count=8).examples == first.examples[:8]
    assert len({e.answer for e in first.examples}) > 1  # the answer's place is drawn, not fixed


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_count_caps_the_examples_and_small_text_gives_fewer(name):
    candidates = len(build_builtin(name, CODE, seed=0, count=10_000).examples)
    assert 20 < candidates < 10_000
    assert len(build_builtin(name, CODE, seed=0, count=5).examples) == 5


def test_next_line_answers_are_the_true_next_line_against_lines_of_other_documents():
    task = build_builtin("next_line", CODE, seed=1, count=200)
    assert len(task.examples) == 200
    first = {document_of(CODE, e.context + e.choices[e.answer] + "\n") for e in task.examples[:12]}
    assert len(first) >= 5  # drawn from across the text, not its first document
    for example in task.examples:
        answer = example.choices[example.answer]
        assert example.context.endswith("\n") and "\n" not in answer
        source = document_of(CODE, example.context + answer + "\n")
        assert f"\n{example.context}{answer}\n" in "\n" + CODE.documents[source][1]  # whole lines
        assert len(example.context.splitlines()) <= 4
        for index, choice in enumerate(example.choices):
            if index != example.answer:
                assert choice.strip() != answer.strip() and choice.strip() not in example.context
                homes = [i for i, (_, text) in enumerate(CODE.documents) if choice in text.split("\n")]
                assert homes and source not in homes  # a whole line, of another document ...
                assert {CODE.documents[i][0] for i in homes} == {CODE.documents[source][0]}  # ... of the same domain


def test_next_line_skips_short_lines_and_uses_other_domains_only_when_it_must():
    code = "x = 1\ny = 2\nfirst line of code here\nsecond line of code here\n"
    prose_text = ("A line of prose for the pool.\nAnother line of prose, longer.\n"
                  "Yet another line of prose.\nThe last line of prose here.\n")
    heldout = HeldoutText((("code", code), ("prose", prose_text)), False)
    task = build_builtin("next_line", heldout, seed=0, count=10)
    answers = {e.choices[e.answer] for e in task.examples}
    assert "y = 2" not in answers and "second line of code here" in answers
    code_example = next(e for e in task.examples if e.choices[e.answer] == "second line of code here")
    assert all("prose" in c for i, c in enumerate(code_example.choices) if i != code_example.answer)


def test_rare_word_answers_are_repeated_rare_words_mentioned_earlier_in_the_context():
    task = build_builtin("rare_word", CODE, seed=2, count=100)
    whole = "\n".join(text for _, text in CODE.documents)
    local_variables = {word for _, text in CODE.documents for word in re.findall(r"\b[a-z]+\dx\d\b", text)}
    assert len(local_variables) == 48 <= len(task.examples)
    assert local_variables <= {e.choices[e.answer] for e in task.examples}  # each one's second mention
    for example in task.examples:
        word = example.choices[example.answer]
        document_of(CODE, example.context + word)
        assert occurrences(word, example.context) >= 1 and 2 <= occurrences(word, whole) <= 5
        assert re.fullmatch(WORD, word) and len(word) >= 5
        for index, choice in enumerate(example.choices):
            assert 2 <= occurrences(choice, whole) <= 5
            if index != example.answer:
                assert choice not in example.context and choice != word


def test_no_choice_is_a_prefix_of_another():
    stems = ["stone", "stoned", "stonework", "stoneware", "stonewall", "stoner", "stones", "stonewalled"]
    text = "".join(f"{stem} is here; so {stem} is here again.\n" + "filler line of text\n" * 6 for stem in stems)
    heldout = HeldoutText((("text", text),), False)
    for seed in range(20):
        for example in build_builtin("rare_word", heldout, seed=seed, count=10).examples:
            assert all(a == b or not a.startswith(b) for a in example.choices for b in example.choices)


def test_distractors_are_not_shorter_than_the_answer_on_average():
    """Per-byte scoring would favour the (longer) answer even in an untrained model."""
    rng = random.Random(0)
    words = sorted({"".join(rng.choices(string.ascii_lowercase, k=length)) for length in range(5, 13)
                    for _ in range(25)})
    heldout = HeldoutText(tuple(("text", f"see {word} then {word}\n") for word in words), False)
    examples = build_builtin("rare_word", heldout, seed=0, count=1000).examples
    differences = [len(c) - len(e.choices[e.answer]) for e in examples for c in e.choices]
    assert len(examples) == len(words) and abs(sum(differences) / len(differences)) < 0.1


def test_rare_word_needs_a_word_repeated_within_its_document():
    once = HeldoutText((("text", "alphabet soup and bravado\n"), ("text", "alphabet again, bravado again\n")), False)
    with pytest.raises(FlopwiseError, match=r"^built-in task 'rare_word' found no rare word") as error:
        build_builtin("rare_word", once, seed=0, count=10)
    assert "\n" not in str(error.value)


def test_doc_to_name_names_the_function_whose_docstring_starts_the_comment():
    task = build_builtin("doc_to_name", CODE, seed=5, count=100)
    documented = docstrings(CODE)
    assert len(task.examples) == 48
    for example in task.examples:
        comment, rest = example.context.split("\n")
        assert comment.startswith("# ") and rest == "def "
        name = example.choices[example.answer]
        assert documented[name].startswith(comment[2:])
        assert all(choice in documented for choice in example.choices)
        assert len(set(example.choices)) == 4


def test_code_to_doc_continues_a_header_with_its_docstrings_first_line():
    task = build_builtin("code_to_doc", CODE, seed=6, count=100)
    documented = docstrings(CODE)
    first_lines = {doc.split("\n")[0] for doc in documented.values()}
    assert len(task.examples) == 48
    for example in task.examples:
        assert example.context.endswith('    """') and example.context.startswith("def ")
        name = re.match(rf"def ({WORD})\(", example.context).group(1)
        assert documented[name].split("\n")[0] == example.choices[example.answer]
        document_of(CODE, example.context + example.choices[example.answer])
        assert set(example.choices) <= first_lines and len(set(example.choices)) == 4


def test_definitions_are_found_in_pieces_of_files_that_do_not_parse():
    piece = module(0)[40:] + "\n\ndef cut_off(a, b=(1, 2),\n           c=None) -> int:\n    '''Add the numbers"
    heldout = HeldoutText((("code", piece), *CODE.documents[1:]), True)
    with pytest.raises(SyntaxError):
        ast.parse(piece)
    examples = build_builtin("code_to_doc", heldout, seed=0, count=1000).examples
    cut = [e for e in examples if e.choices[e.answer] == "Add the numbers"]
    assert len(cut) == 1 and cut[0].context.endswith("c=None) -> int:\n    '''")


def test_default_corpus_tasks_refuse_other_corpora_in_one_line():
    assert builtin_names(PROSE) == ["next_line", "rare_word"]
    assert builtin_names(CODE) == list(BUILTIN_TASKS)
    for name in DEFAULT_CORPUS_ONLY:
        with pytest.raises(FlopwiseError, match=rf"^built-in task '{name}' needs the default corpus") as error:
            build_builtin(name, PROSE, seed=0, count=10)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_text_without_candidates_is_refused_in_one_line_naming_the_task(name):
    empty = HeldoutText((("code", "x = 1\n"), ("prose", "Short.\n")), default_corpus=True)
    assert builtin_names(empty) == []
    with pytest.raises(FlopwiseError, match=rf"^built-in task '{name}' found no .*: it needs") as error:
        build_builtin(name, empty, seed=0, count=10)
    assert "\n" not in str(error.value)


def test_an_unknown_task_is_refused_with_the_names():
    with pytest.raises(FlopwiseError, match="there is no built-in task 'nope': use one of next_line"):
        build_builtin("nope", CODE, seed=0, count=10)


def test_heldout_text_from_a_real_corpus_gives_tasks_taken_from_its_files(text_folder, code_folder):
    data = prepare_data(DataSection(sources=[f"code={code_folder}", f"prose={text_folder}"], tokenizer="byte"), 0)
    heldout = HeldoutText.from_corpus(data.corpus, data.tokenizer, default_corpus=True)
    files = {"code": [p.read_text(encoding="utf-8") for p in sorted(code_folder.iterdir())],
             "prose": [p.read_text(encoding="utf-8") for p in sorted(text_folder.iterdir())]}
    assert len(heldout.documents) == len(data.corpus.val_docs) > 2
    assert {domain for domain, _ in heldout.documents} == {"code", "prose"}
    for domain, text in heldout.documents:  # each a piece of one file of its domain, the end-of-text dropped
        assert text and any(text in content for content in files[domain])
    names = builtin_names(heldout)
    assert names[:2] == ["next_line", "rare_word"]
    held_out = [text for _, text in heldout.documents]
    for name in names:
        task = build_builtin(name, heldout, seed=0, count=50)
        check_shape(task, name)
        for example in task.examples:
            answer = example.choices[example.answer]
            if name == "doc_to_name":
                keyword = example.context.rsplit("\n", 1)[1]
                assert any(f"{keyword}{answer}" in text for text in held_out)
            else:  # the context and its answer are one run of held-out text
                assert any(example.context + answer in text for text in held_out)
