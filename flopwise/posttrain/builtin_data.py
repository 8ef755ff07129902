"""Built-in post-training data: questions about the running Python, answered by its own documentation, so a fresh
machine can try supervised fine-tuning and preference tuning offline.

Instructions ask about the public top-level functions and classes of the pure-Python standard library, and the
public methods of those classes ("What does `json.dumps` do?"), answered by the first paragraph of the docstring;
and about the pydoc help topics ("Explain the `with` statement."), answered by the topic's opening paragraphs.
Sources are parsed with ``ast``, never imported: importing arbitrary modules has side effects (``antigravity``
opens a browser, ``this`` prints).  A preference pair takes the right answer as chosen and another name's answer
as rejected, so the two replies differ in substance, not in form.  The held-out split is by top-level package
(a package and its submodules go to one side, so near-copies in sibling modules do not leak) and by help topic.
Everything is generated at run time, deterministic for a seed and a Python version; nothing is shipped or
written to disk.
"""

from __future__ import annotations

import ast
import functools
import itertools
import os
import random
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flopwise.errors import FlopwiseError
from flopwise.posttrain.conversations import Conversation, Message, PreferencePair

HELD_OUT_SHARE = 0.1  # of the packages, and separately of the help topics
MIN_ANSWER_CHARS = 40  # a shorter first paragraph ("Return self.") teaches little
MAX_ANSWER_CHARS = 600  # keeps answers to a few sentences, so a small model's context holds a whole exchange
SYSTEM_SHARE = 0.25  # of conversations that open with a system prompt, so both kinds are seen
SKIPPED_PACKAGES = frozenset({"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3",
                              "ensurepip"})  # test suites, GUI demos and bundled installers: not an API to ask about
QUESTIONS = {
    "function": ("What does `{}` do?", "Explain `{}`.", "What is `{}` used for?", "Describe `{}` briefly."),
    "class": ("What is `{}` for?", "Explain `{}`.", "What does the class `{}` represent?",
              "Describe the class `{}`."),
    "topic": ("Explain {}.", "What should I know about {} in Python?", "Tell me about {} in Python."),
}
SYSTEM_PROMPTS = ("You are a helpful assistant who knows the Python standard library.",
                  "You answer questions about Python briefly and accurately.",
                  "You are an expert Python programmer. Explain things clearly.")
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")  # blank lines; the next line keeps its indent
_UNDERLINE = re.compile(r"^[=\-*~^]+$", re.MULTILINE)  # a heading's underline or a rule in a help topic
_VERSION_NOTE = re.compile(r"(New|Changed) in version|Deprecated since")
_TRIES = 20  # random draws for a rejected answer before falling back to a scan


@dataclass(frozen=True)
class _Entry:
    """One documented name or help topic: what to ask about, the answer the docs give, and its split unit."""

    kind: str  # "function", "class" or "topic"
    subject: str  # "json.dumps", or "the `with` statement"
    answer: str
    unit: str  # held out together: a top-level package, or one help topic
    source: str


def builtin_instructions(seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out) question-answer conversations; the seed picks the held-out packages and topics, the
    question wording and which conversations get a system prompt."""
    train, held_out = _split(seed)
    return [conversation for _, conversation in train], [conversation for _, conversation in held_out]


def builtin_preferences(seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) preference pairs over the same questions and split as ``builtin_instructions``; the
    rejected reply is another name's answer from the same split, from another package where there is one."""
    rng = random.Random(f"flopwise-preferences:{seed}")
    train, held_out = _split(seed)
    return _pairs(train, rng), _pairs(held_out, rng)


# ---------------------------------------------------------------- questions, split and pairs


def _split(seed: int) -> tuple[list[tuple[_Entry, Conversation]], list[tuple[_Entry, Conversation]]]:
    entries = _entries()
    held = _held_out_units(entries, seed)
    rng = random.Random(f"flopwise-questions:{seed}")
    train: list[tuple[_Entry, Conversation]] = []
    held_out: list[tuple[_Entry, Conversation]] = []
    for entry in entries:
        (held_out if entry.unit in held else train).append((entry, _conversation(entry, rng)))
    return train, held_out


def _held_out_units(entries: tuple[_Entry, ...], seed: int) -> set[str]:
    """A seeded share of the packages and, separately, of the topics, so the held-out split has both kinds."""
    rng = random.Random(f"flopwise-split:{seed}")
    held: set[str] = set()
    for is_topic in (False, True):
        units = sorted({entry.unit for entry in entries if (entry.kind == "topic") == is_topic})
        held.update(rng.sample(units, max(1, round(HELD_OUT_SHARE * len(units)))))
    return held


def _conversation(entry: _Entry, rng: random.Random) -> Conversation:
    question = rng.choice(QUESTIONS[entry.kind]).format(entry.subject)
    system = [Message("system", rng.choice(SYSTEM_PROMPTS))] if rng.random() < SYSTEM_SHARE else []
    return Conversation(tuple(system + [Message("user", question), Message("assistant", entry.answer)]),
                        entry.source)


def _pairs(split: list[tuple[_Entry, Conversation]], rng: random.Random) -> list[PreferencePair]:
    """Rivals come from the same kind (a topic's rejected reply is another topic's), so form gives nothing away."""
    pools = {is_topic: [entry for entry, _ in split if (entry.kind == "topic") == is_topic]
             for is_topic in (False, True)}
    pairs = []
    for entry, conversation in split:
        rival = _rival(entry, pools[entry.kind == "topic"], rng)
        if rival is not None:
            pairs.append(PreferencePair(conversation.messages[:-1], entry.answer, rival.answer, entry.source))
    return pairs


def _rival(entry: _Entry, pool: list[_Entry], rng: random.Random) -> _Entry | None:
    """Another entry with a different answer, from another unit: of a few random draws, the one whose answer is
    closest in length, so that length says little about which reply is right (a summed log-probability
    favours the shorter reply, whatever it says)."""
    draws = [other for other in (rng.choice(pool) for _ in range(_TRIES))
             if other.unit != entry.unit and other.answer != entry.answer]
    if draws:
        return min(draws, key=lambda other: abs(len(other.answer) - len(entry.answer)))
    return next((other for other in pool if other.answer != entry.answer), None)


# ---------------------------------------------------------------- what the standard library documents


@functools.cache
def _entries() -> tuple[_Entry, ...]:
    """Every entry, in a fixed order; kept in memory because parsing the library takes about a second."""
    root = Path(sysconfig.get_paths()["stdlib"])
    api = [entry for module, path in _modules(root) for entry in _module_entries(module, path)]
    if not api:
        raise FlopwiseError(f"no standard library sources under '{root}': the built-in post-training data is "
                            "built from them; give your own JSONL data instead")
    return tuple(api + _topic_entries())


def _public(name: str) -> bool:
    return not name.startswith(("_", "."))


def _modules(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted name, file) of the public pure-Python modules, in sorted order.  Only packages are entered, so
    site-packages, lib-dynload and config folders are never walked."""
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        subfolders[:] = sorted(name for name in subfolders if _public(name) and name not in SKIPPED_PACKAGES
                               and (here / name / "__init__.py").is_file())
        package = here.relative_to(root).parts
        for name in sorted(files):
            stem = name.removesuffix(".py")
            if name.endswith(".py") and (stem == "__init__" or _public(stem)):
                parts = package if stem == "__init__" else (*package, stem)
                if parts:
                    yield ".".join(parts), here / name


def _module_entries(module: str, path: Path) -> list[_Entry]:
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return []  # an unreadable or unparsable file only means fewer examples
    entries: dict[str, _Entry] = {}
    for name, kind, node in _definitions(tree):
        answer = _docstring_answer(ast.get_docstring(node))
        subject = f"{module}.{name}"
        if answer and subject not in entries:  # the first of a redefined name (a property's setter) is documented
            entries[subject] = _Entry(kind, subject, answer, module.split(".")[0], f"built-in:{module}")
    return list(entries.values())


def _definitions(tree: ast.Module) -> Iterator[tuple[str, str, ast.AST]]:
    """Public top-level functions and classes, and the public methods of those classes, in source order."""
    for node in tree.body:
        if isinstance(node, _FUNCTIONS) and _public(node.name):
            yield node.name, "function", node
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            yield node.name, "class", node
            for member in node.body:
                if isinstance(member, _FUNCTIONS) and _public(member.name):
                    yield f"{node.name}.{member.name}", "function", member


def _docstring_answer(docstring: str | None) -> str | None:
    """The cleaned docstring's first paragraph, capped; None when there is none worth teaching."""
    if docstring is None:
        return None
    answer = _capped(_first_paragraph(docstring))
    return answer if len(answer) >= MIN_ANSWER_CHARS else None


def _first_paragraph(text: str) -> str:
    return _PARAGRAPH_BREAK.split(text.strip(), maxsplit=1)[0]


def _capped(text: str) -> str:
    """At most MAX_ANSWER_CHARS: cut after the last full sentence that fits, else at a word, marked '...'."""
    if len(text) <= MAX_ANSWER_CHARS:
        return text
    cut = text[:MAX_ANSWER_CHARS]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    if end + 1 >= MIN_ANSWER_CHARS:
        return cut[:end + 1]
    return cut[:MAX_ANSWER_CHARS - 4].rsplit(maxsplit=1)[0] + " ..."


def _topic_entries() -> list[_Entry]:
    """One entry per pydoc help topic with prose; topics sharing a title ('if' and 'else') are kept once."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package the help topics separately
        return []
    entries: dict[str, _Entry] = {}
    for key in sorted(topics):
        title, _, body = topics[key].partition("\n")
        subject, answer = _subject(title.strip()), _opening(body)
        if answer and subject not in entries:
            entries[subject] = _Entry("topic", subject, answer, f"pydoc_data.topics:{key}",
                                      f"built-in:pydoc_data.topics:{key}")
    return list(entries.values())


def _subject(title: str) -> str:
    """'The "with" statement' -> 'the `with` statement': code in backticks, and a leading 'The' or a sentence-case
    title lowered so it reads inside a question; title-case names ('Format String Syntax') stay as they are."""
    title = re.sub(r'"([^"]+)"', r"`\1`", title)
    words = title.split()
    if words[0] == "The" or not any(word[:1].isupper() for word in words[1:]):
        return title[0].lower() + title[1:]
    return title


def _opening(body: str) -> str:
    """The topic's first run of prose paragraphs, up to the cap; grammar, code, headings and notes are skipped,
    and so is a later paragraph ending in ':', which introduces something left out."""
    paragraphs = itertools.dropwhile(lambda p: not _prose(p), _PARAGRAPH_BREAK.split(body))
    prose = [paragraph.strip() for paragraph in itertools.takewhile(_prose, paragraphs)]
    if not prose:
        return ""
    answer = _capped(prose[0])
    for paragraph in prose[1:]:
        if paragraph.endswith(":") or len(answer) + 2 + len(paragraph) > MAX_ANSWER_CHARS:
            break
        answer += "\n\n" + paragraph
    return answer if len(answer) >= MIN_ANSWER_CHARS else ""


def _prose(paragraph: str) -> bool:
    return bool(paragraph.strip()) and not paragraph.lstrip("\n")[:1].isspace() \
        and not _UNDERLINE.search(paragraph) and not paragraph.startswith("**") \
        and not _VERSION_NOTE.match(paragraph.strip())
