"""Post-training data as a run trains on it: read (files or built-in), split into training and held-out
records, rendered with the chat template and cut to the window, with counts for the run summary.

SFT's built-in data is given by the stage (``builtin``): the SFT stage adds the RL tasks, answered, to the
standard-library questions (``flopwise.rl.tasks.builtin_sft_data``).

A file's held-out records are a seeded share of it (``posttrain.heldout``), so each source is scored; the
built-in data is held out by package and help topic instead (flopwise/posttrain/builtin_data.py).  At most
``posttrain.heldout_max`` held-out records are kept, a seeded sample in their original order, so evaluation
stays a small part of a short budget.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flopwise.config import PostTrainSection
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.posttrain.builtin_data import builtin_instructions, builtin_preferences
from flopwise.posttrain.conversations import Conversation, PreferencePair, read_conversations, read_preferences
from flopwise.posttrain.preference import RenderedPair, prepare_pairs, render_pair
from flopwise.posttrain.sampler import PrepareStats, Rendered, prepare
from flopwise.posttrain.template import render

Record = TypeVar("Record")  # a conversation, a preference pair or an RL task: each has its .source
BUILTIN_TOPICS = "built-in:pydoc_data.topics"  # the prefix of the help topics' sources
BUILTIN_TASKS = "built-in:tasks"  # the built-in RL tasks, answered, in SFT's built-in data


@dataclass
class Split:
    """Rendered training and held-out records (conversations, or pairs), the names of their sources (a record's
    ``source`` indexes them) and what cutting to the window did to each side."""

    train: list[Any]
    heldout: list[Any]
    sources: list[str]
    train_stats: PrepareStats
    heldout_stats: PrepareStats
    equal: int = 0  # preference pairs left out because their two replies are the same

    def describe(self, kind: str, seq_len: int) -> str:
        """One line for the run's start: counts, sources and what the window cut."""
        cut = self.train_stats.truncated + self.heldout_stats.truncated
        dropped = self.train_stats.dropped + self.heldout_stats.dropped
        equal = f"; {self.equal} left out (the same chosen and rejected reply)" if self.equal else ""
        return (f"data: {len(self.train):,} training and {len(self.heldout):,} held-out {kind} from "
                f"{len(self.sources)} source(s); {cut} truncated to the {seq_len}-token window, {dropped} dropped "
                f"(no reply within it){equal}")

    def to_dict(self) -> dict[str, Any]:
        return {"train": len(self.train), "heldout": len(self.heldout), "sources": self.sources,
                "train_truncated": self.train_stats.truncated, "train_dropped": self.train_stats.dropped,
                "heldout_truncated": self.heldout_stats.truncated, "heldout_dropped": self.heldout_stats.dropped,
                "equal_pairs": self.equal}


def source_name(source: str) -> str:
    """The name a record's source is reported under: its file, or the built-in data's two kinds (one name per
    standard-library module would be hundreds of tiny sources)."""
    if source.startswith(BUILTIN_TOPICS):
        return "built-in:help-topics"
    if source.startswith(BUILTIN_TASKS):
        return BUILTIN_TASKS
    return "built-in:docstrings" if source.startswith("built-in:") else source


def sft_split(section: PostTrainSection, tokenizer: Tokenizer, seq_len: int, seed: int,
              builtin: Callable[[int], tuple[list[Conversation], list[Conversation]]] = builtin_instructions) -> Split:
    """The conversations of ``section.data`` (or the ``builtin`` ones), rendered and cut to ``seq_len``."""
    train, heldout = read_split(section, seed, read_conversations, builtin)
    sources = _sources(train + heldout)

    def rendered(conversations: list[Conversation]) -> tuple[list[Rendered], PrepareStats]:
        return prepare([Rendered.of(*render(tokenizer, c.messages), sources.index(source_name(c.source)))
                        for c in conversations], seq_len)

    (train_rows, train_stats), (heldout_rows, heldout_stats) = rendered(train), rendered(heldout)
    _require_fitting(train_rows, heldout_rows, "conversation", "an assistant token", seq_len)
    return Split(train_rows, heldout_rows, sources, train_stats, heldout_stats)


def dpo_split(section: PostTrainSection, tokenizer: Tokenizer, seq_len: int, seed: int) -> Split:
    """The preference pairs of ``section.data`` (or the built-in ones), rendered and cut to ``seq_len``."""
    train, heldout = read_split(section, seed, read_preferences, builtin_preferences)
    sources = _sources(train + heldout)
    # a pair with the same reply on both sides has no gradient (its margin is 0 whatever the weights): it would only
    # dilute the batches and count as a miss in the held-out accuracy
    equal = sum(pair.chosen == pair.rejected for pair in train + heldout)
    train, heldout = ([pair for pair in part if pair.chosen != pair.rejected] for part in (train, heldout))
    for part, kept in (("training", train), ("held-out", heldout)):
        if not kept:
            raise FlopwiseError(f"every {part} preference pair has the same chosen and rejected reply ({equal} such "
                                "pairs in all), so DPO has nothing to learn or measure: give pairs whose replies "
                                "differ")

    def rendered(pairs: list[PreferencePair]) -> tuple[list[RenderedPair], PrepareStats]:
        return prepare_pairs([render_pair(tokenizer, pair, sources.index(source_name(pair.source)))
                              for pair in pairs], seq_len)

    (train_pairs, train_stats), (heldout_pairs, heldout_stats) = rendered(train), rendered(heldout)
    _require_fitting(train_pairs, heldout_pairs, "preference pair", "a reply token on both sides", seq_len)
    return Split(train_pairs, heldout_pairs, sources, train_stats, heldout_stats, equal)


def _require_fitting(train: Sequence[object], heldout: Sequence[object], record: str, target: str,
                     seq_len: int) -> None:
    """Refuse, in one line, a split where no training or no held-out record keeps ``target`` within the window
    (their prompts fill it): there would be nothing to train on, or nothing to measure the run."""
    for part, kept in (("training", train), ("held-out", heldout)):
        if not kept:
            raise FlopwiseError(f"no {part} {record} keeps {target} within model.seq_len={seq_len} (the prompts fill "
                                "the window): raise model.seq_len, or give shorter prompts")


def _sources(records: Sequence[Conversation | PreferencePair]) -> list[str]:
    return list(dict.fromkeys(source_name(record.source) for record in records))


def read_split(section: PostTrainSection, seed: int, read: Callable[[Path], list[Record]],
             builtin: Callable[[int], tuple[list[Record], list[Record]]]) -> tuple[list[Record], list[Record]]:
    """(training, held-out) records of the files, each split by its own seeded share, or the built-in split."""
    if not section.data:
        train, heldout = builtin(seed)
    else:
        train, heldout = [], []
        for index, name in enumerate(section.data):
            records = read(_data_file(name))
            held = _held_out_indices(len(records), section.heldout, random.Random(f"{seed}:{index}"))
            train += [record for i, record in enumerate(records) if i not in held]
            heldout += [record for i, record in enumerate(records) if i in held]
    if not train:
        raise FlopwiseError(f"posttrain.heldout={section.heldout:g} leaves nothing to train on: lower it, or give "
                            "more records")
    if not heldout:
        raise FlopwiseError(f"posttrain.heldout={section.heldout:g} holds out no record, so nothing would measure the "
                            "run: give files of at least 2 records, or raise it")
    if len(heldout) > section.heldout_max:
        keep = set(random.Random(f"{seed}:heldout").sample(range(len(heldout)), section.heldout_max))
        heldout = [record for i, record in enumerate(heldout) if i in keep]
    return train, heldout


def _held_out_indices(count: int, share: float, rng: random.Random) -> set[int]:
    """A seeded ``share`` of ``count`` records, at least one while another is left to train on."""
    return set(rng.sample(range(count), min(max(1, round(share * count)), count - 1)))


def _data_file(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        raise FlopwiseError(f"posttrain.data '{name}' is a folder: give JSONL files (--data a.jsonl --data b.jsonl)")
    if not path.is_file():
        raise FlopwiseError(f"posttrain.data '{name}' does not exist: give the path of a JSONL file")
    return path
