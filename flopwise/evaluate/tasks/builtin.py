"""Built-in tasks made from the held-out split of the data the run trained on, so that any corpus, a user's
own included, gets a downstream-style signal with no download, on text the model never trained on.

Every task is four-way multiple choice, generated from a seed (never shipped):

- next_line: the lines before a line, then the true line against lines of similar length from other held-out
  documents (of the same domain when there are any);
- rare_word: the text before a word that occurs 2 to 5 times in the held-out text, at an occurrence whose
  earlier mention is in the context (so copying it is learnable), against other rare words of similar length;
- doc_to_name (default corpus): the first sentence of a function's docstring as a comment, then ``def ``,
  and the function's name against other held-out functions' names (classes likewise, with ``class ``);
- code_to_doc (default corpus): a function's ``def`` line(s) up to its docstring, and the docstring's first
  line against other held-out functions' first docstring lines (classes likewise).

Candidates are taken in a seeded order and each one gets its distractors and its answer's place from the same
seeded stream, so a larger count only adds examples after the same first ones.  A distractor is never a
prefix of another choice (nor has one), and never occurs in the context, where copying would favour it.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from flopwise.data.shards import TokenCorpus
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.evaluate.tasks.spec import Example, Task

BUILTIN_TASKS: tuple[str, ...] = ("next_line", "rare_word", "doc_to_name", "code_to_doc")
DEFAULT_CORPUS_ONLY = frozenset({"doc_to_name", "code_to_doc"})
SOURCE = "built-in"
CHOICES = 4
MAX_CONTEXT_CHARS = 400  # about 100 BPE tokens: a context fits a short model window with its choices
MAX_CHOICE_CHARS = 120
MAX_SUMMARY_CHARS = 200  # a docstring sentence longer than this is a paragraph, not a summary
MIN_CONTENT_CHARS = 8  # non-space characters of a line worth predicting
CONTEXT_LINES = 4
RARE_COUNTS = range(2, 6)  # how often a rare word occurs in the whole held-out text
MIN_WORD_CHARS = 5
MAX_HEADER_LINES = 8
MAX_DOCSTRING_LINES = 30
SIMILAR = 32  # distractors come from this many pool entries on either side of the answer's length
CODE_DOMAIN = "code"

_WORD = re.compile(rf"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]{{{MIN_WORD_CHARS - 1},}}(?![A-Za-z0-9_])")
_DEFINITION = re.compile(r"[ \t]*(?:async[ \t]+)?(def|class)[ \t]+([A-Za-z_]\w*)[ \t]*[(:]")
_DOCSTRING_OPEN = re.compile(r"[ \t]*[rRuU]?(\"\"\"|''')")
_PARAGRAPH_END = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")

_NEEDS_CODE = ("no function or class with a docstring (and three others) in the held-out text: it needs Python "
               "code, as the default corpus has")
_NOT_FOUND = {
    "next_line": "no line to predict (8 or more characters, after other lines) with three lines of other held-out "
                 "documents to set against it: it needs held-out text of two or more documents of several lines "
                 "(add data or raise data.val_fraction)",
    "rare_word": "no rare word (5 or more letters, 2 to 5 times in the held-out text) repeated within a few lines, "
                 "with three others to set against it: it needs more held-out text (add data or raise "
                 "data.val_fraction)",
    "doc_to_name": _NEEDS_CODE,
    "code_to_doc": _NEEDS_CODE,
}


@dataclass(frozen=True)
class HeldoutText:
    """The held-out documents as text, in corpus order, and whether they come from the built-in corpus."""

    documents: tuple[tuple[str, str], ...]  # (domain, text)
    default_corpus: bool

    @classmethod
    def from_corpus(cls, corpus: TokenCorpus, tokenizer: Tokenizer, default_corpus: bool) -> HeldoutText:
        """Each held-out document decoded without its end-of-text token."""
        tokens = np.asarray(corpus.val_tokens)
        return cls(tuple((corpus.domains[int(domain)], tokenizer.decode(tokens[start:start + length - 1].tolist()))
                         for start, length, domain in corpus.val_docs), default_corpus)


@dataclass(frozen=True)
class _Candidate:
    """A context and its true continuation, with where it comes from (to draw distractors elsewhere)."""

    context: str
    answer: str
    document: int
    domain: str


_Pool = list[tuple[int, str, tuple[int, ...]]]  # (length, text, the documents holding it), sorted


@dataclass(frozen=True)
class _Source:
    """What one task draws from: its candidates and, per domain ("" for all), its distractors."""

    candidates: list[_Candidate]
    pools: dict[str, _Pool]
    other_document: bool  # distractors must not occur in the answer's document


@dataclass(frozen=True)
class _Definition:
    """A function or class with a docstring: the text up to the docstring's first word, and that docstring."""

    document: int
    keyword: str  # "def" or "class": each draws its distractors from its own kind
    name: str
    head: str
    docstring: str


def builtin_names(heldout: HeldoutText) -> list[str]:
    """The built-in tasks this text gives examples for (the default-corpus ones only on the default corpus)."""
    return [name for name in BUILTIN_TASKS
            if (heldout.default_corpus or name not in DEFAULT_CORPUS_ONLY) and _examples(name, heldout, 0, 1)]


def build_builtin(name: str, heldout: HeldoutText, seed: int, count: int) -> Task:
    """Up to ``count`` examples of built-in task ``name``, the same for the same text, seed and count."""
    if name not in BUILTIN_TASKS:
        raise FlopwiseError(f"there is no built-in task '{name}': use one of {', '.join(BUILTIN_TASKS)}")
    if name in DEFAULT_CORPUS_ONLY and not heldout.default_corpus:
        raise FlopwiseError(f"built-in task '{name}' needs the default corpus (the standard library's Python code) "
                            "and this run trained on other data: leave it out, or use next_line or rare_word")
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    examples = _examples(name, heldout, seed, count)
    if not examples:
        raise FlopwiseError(f"built-in task '{name}' found {_NOT_FOUND[name]}")
    return Task(name, "choice", tuple(examples), SOURCE)


def _examples(name: str, heldout: HeldoutText, seed: int, count: int) -> list[Example]:
    """Candidates in a seeded order, each with three distractors if it has them, until ``count``."""
    source = _SOURCES[name](heldout)
    rng = np.random.default_rng(seed)
    examples = []
    for index in rng.permutation(len(source.candidates)):
        candidate = source.candidates[index]
        distractors = (_distractors(candidate, source.pools[candidate.domain], source.other_document, rng)
                       or _distractors(candidate, source.pools[""], source.other_document, rng))
        if distractors:
            answer = int(rng.integers(CHOICES))
            choices = (*distractors[:answer], candidate.answer, *distractors[answer:])
            examples.append(Example(candidate.context, choices, answer))
            if len(examples) == count:
                break
    return examples


def _distractors(candidate: _Candidate, pool: _Pool, other_document: bool,
                 rng: np.random.Generator) -> list[str] | None:
    """Three pool texts of about the answer's length, in random order, or None if too few are allowed.  The
    window is centred on the texts of the answer's very length, so distractors are not shorter on average
    (a length bias that per-byte scoring would reward even in an untrained model)."""
    length = len(candidate.answer)
    middle = (bisect.bisect_left(pool, (length,)) + bisect.bisect_left(pool, (length + 1,))) // 2
    window = pool[max(0, middle - SIMILAR):middle + SIMILAR]
    chosen: list[str] = []
    for index in rng.permutation(len(window)):
        _, text, documents = window[index]
        if ((other_document and candidate.document in documents) or text.strip() in candidate.context
                or _overlaps(text, [candidate.answer, *chosen])):
            continue
        chosen.append(text)
        if len(chosen) == CHOICES - 1:
            return chosen
    return None


def _overlaps(text: str, others: Sequence[str]) -> bool:
    """Whether ``text`` (without outer whitespace) equals or is a prefix of another, or has one as its prefix."""
    text = text.strip()
    return any(text.startswith(other.strip()) or other.strip().startswith(text) for other in others)


def _pools(entries: list[tuple[str, str, int]]) -> dict[str, _Pool]:
    """(domain, text, document) entries as pools of distinct texts sorted by length, one per domain and ""
    for all, each text with the documents it occurs in."""
    homes: dict[str, dict[str, set[int]]] = {"": {}}
    for domain, text, document in entries:
        for pool in (homes.setdefault(domain, {}), homes[""]):
            pool.setdefault(text, set()).add(document)
    return {domain: sorted((len(text), text, tuple(sorted(documents))) for text, documents in pool.items())
            for domain, pool in homes.items()}


def _is_content(line: str) -> bool:
    """A line worth predicting: not too long, with content."""
    return len(line) <= MAX_CHOICE_CHARS and _has_content(line)


def _has_content(text: str) -> bool:
    """Enough non-space characters, some of them letters or digits."""
    return sum(not c.isspace() for c in text) >= MIN_CONTENT_CHARS and any(c.isalnum() for c in text)


# ---------------------------------------------------------------- the tasks' candidates


def _next_line(heldout: HeldoutText) -> _Source:
    """Every content line after some content, its context the up to four lines before it."""
    candidates, entries = [], []
    for document, (domain, text) in enumerate(heldout.documents):
        lines = text.split("\n")
        for index, line in enumerate(lines):
            answer = line.rstrip()
            if not _is_content(answer):
                continue
            entries.append((domain, answer, document))
            context = _lines_before(lines, index)
            if _has_content(context):
                candidates.append(_Candidate(context, answer, document, domain))
    return _Source(candidates, _pools(entries), other_document=True)


def _lines_before(lines: list[str], index: int) -> str:
    """Up to CONTEXT_LINES lines before ``lines[index]``, each with its newline, within MAX_CONTEXT_CHARS."""
    context = ""
    for line in reversed(lines[max(0, index - CONTEXT_LINES):index]):
        if len(context) + len(line) + 1 > MAX_CONTEXT_CHARS:
            break
        context = line + "\n" + context
    return context


def _rare_word(heldout: HeldoutText) -> _Source:
    """Every repeated occurrence of a rare word whose previous occurrence lies in its context."""
    found = [(document, match.start(), match.group()) for document, (_, text) in enumerate(heldout.documents)
             for match in _WORD.finditer(text)]
    counts = Counter(word for _, _, word in found)
    previous: dict[tuple[int, str], int] = {}
    candidates, entries = [], []
    for document, start, word in found:
        if counts[word] not in RARE_COUNTS:
            continue
        domain, text = heldout.documents[document]
        last = previous.get((document, word))
        previous[(document, word)] = start
        if last is None:
            entries.append((domain, word, document))
            continue
        context_start = _context_start(text, start)
        if context_start is not None and context_start <= last:
            candidates.append(_Candidate(text[context_start:start], word, document, domain))
    return _Source(candidates, _pools(entries), other_document=False)


def _context_start(text: str, end: int) -> int | None:
    """The first line start within MAX_CONTEXT_CHARS before ``end``, None if its own line is longer."""
    if end <= MAX_CONTEXT_CHARS:
        return 0
    newline = text.find("\n", end - MAX_CONTEXT_CHARS - 1, end)
    return None if newline < 0 else newline + 1


def _doc_to_name(heldout: HeldoutText) -> _Source:
    """Functions and classes whose docstring starts with a sentence, named after it as a comment and their
    keyword (``# Return the sum.`` and ``def `` below it, then ``total``); not special methods, whose docstrings
    say little."""
    named = [d for d in _definitions(heldout) if not (d.name.startswith("__") and d.name.endswith("__"))]
    candidates = [_Candidate(f"# {summary}\n{d.keyword} ", d.name, d.document, d.keyword)
                  for d in named if (summary := _summary(d.docstring))]
    return _Source(candidates, _pools([(d.keyword, d.name, d.document) for d in named]), other_document=False)


def _code_to_doc(heldout: HeldoutText) -> _Source:
    """Functions and classes whose docstring's first line is content, after their header up to the docstring."""
    described = [(d, first) for d in _definitions(heldout)
                 if _is_content(first := d.docstring.split("\n", 1)[0].rstrip())]
    candidates = [_Candidate(d.head, first, d.document, d.keyword)
                  for d, first in described if len(d.head) <= MAX_CONTEXT_CHARS]
    return _Source(candidates, _pools([(d.keyword, first, d.document) for d, first in described]),
                   other_document=False)


def _definitions(heldout: HeldoutText) -> list[_Definition]:
    """Functions and classes with a triple-quoted docstring in the code documents, in order (read by lines: a
    document may be a piece of a file, which a parser would refuse)."""
    definitions = []
    for document, (domain, text) in enumerate(heldout.documents):
        if domain != CODE_DOMAIN:
            continue
        lines = text.split("\n")
        for index, line in enumerate(lines):
            match = _DEFINITION.match(line)
            if match and (definition := _definition(lines, index, match, document)):
                definitions.append(definition)
    return definitions


def _definition(lines: list[str], index: int, match: re.Match[str], document: int) -> _Definition | None:
    """The function or class whose header starts at ``lines[index]``, if a docstring follows it."""
    end = _header_end(lines, index)
    if end is None or end + 1 >= len(lines):
        return None
    opening = _DOCSTRING_OPEN.match(lines[end + 1])
    if not opening:
        return None
    body = "\n".join(lines[end + 1:end + 1 + MAX_DOCSTRING_LINES])[opening.end():]
    closing = body.find(opening.group(1))
    docstring = body if closing < 0 else body[:closing]
    indent = len(docstring) - len(docstring.lstrip())
    head = "\n".join(lines[index:end + 1]) + "\n" + lines[end + 1][:opening.end()] + docstring[:indent]
    return _Definition(document, match.group(1), match.group(2), head, docstring[indent:])


def _header_end(lines: list[str], index: int) -> int | None:
    """The line that ends the header starting at ``lines[index]``: brackets closed and a colon last."""
    depth = 0
    for end in range(index, min(index + MAX_HEADER_LINES, len(lines))):
        line = lines[end]
        depth += sum(line.count(c) for c in "([{") - sum(line.count(c) for c in ")]}")
        if depth <= 0 and line.rstrip().endswith(":"):
            return end
    return None


def _summary(docstring: str) -> str | None:
    """The docstring's first sentence on one line, if it is a short sentence of content."""
    paragraph = " ".join(_PARAGRAPH_END.split(docstring, 1)[0].split())
    end = _SENTENCE_END.search(paragraph)
    sentence = paragraph if end is None else paragraph[:end.start()]
    return sentence if len(sentence) <= MAX_SUMMARY_CHARS and _has_content(sentence) else None


_SOURCES: dict[str, Callable[[HeldoutText], _Source]] = {
    "next_line": _next_line, "rare_word": _rare_word, "doc_to_name": _doc_to_name, "code_to_doc": _code_to_doc}
