"""The post-training data split: a seeded share of each file held out (at least one record), a cap on the
held-out records, the built-in data's sources named by kind, and one-line refusals of paths and shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flopwise.config import PostTrainSection
from flopwise.data.tokenizer import byte_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.posttrain.data import dpo_split, sft_split, source_name
from flopwise.posttrain.template import add_chat_tokens

TOKENIZER = add_chat_tokens(byte_tokenizer())


def write(path: Path, count: int, start: int = 0) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) + "\n"
                            for i in range(start, start + count)), encoding="utf-8")
    return path


def test_each_file_holds_out_its_own_share_and_no_record_is_on_both_sides(tmp_path):
    files = [write(tmp_path / "a.jsonl", 40), write(tmp_path / "b.jsonl", 3, start=100)]
    split = sft_split(PostTrainSection(data=[str(f) for f in files], heldout=0.1), TOKENIZER, 64, seed=0)
    assert split.sources == [str(files[0]), str(files[1])]
    held_sources = [r.source for r in split.heldout]
    assert held_sources.count(0) == 4 and held_sources.count(1) == 1  # 10% of 40; at least one of 3
    assert len(split.train) == 43 - 5
    seen = {tuple(r.ids) for r in split.train}
    assert not seen & {tuple(r.ids) for r in split.heldout}


def test_the_split_follows_the_seed_and_the_cap_keeps_a_sample(tmp_path):
    path = write(tmp_path / "a.jsonl", 60)
    section = PostTrainSection(data=[str(path)], heldout=0.5, heldout_max=7)
    first, again = (sft_split(section, TOKENIZER, 64, seed=1) for _ in range(2))
    other = sft_split(section, TOKENIZER, 64, seed=2)
    assert len(first.heldout) == 7 and len(first.train) == 30
    assert [r.ids.tolist() for r in first.heldout] == [r.ids.tolist() for r in again.heldout]
    assert [r.ids.tolist() for r in first.heldout] != [r.ids.tolist() for r in other.heldout]


def test_preference_pairs_split_the_same_way(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                            for i in range(20)), encoding="utf-8")
    split = dpo_split(PostTrainSection(stage="dpo", data=[str(path)]), TOKENIZER, 64, seed=0)
    assert (len(split.train), len(split.heldout)) == (19, 1)


def test_builtin_sources_are_named_by_kind():
    assert source_name("built-in:json.decoder") == "built-in:docstrings"
    assert source_name("built-in:pydoc_data.topics:with") == "built-in:help-topics"
    assert source_name("data/chats.jsonl") == "data/chats.jsonl"


@pytest.mark.parametrize(("make", "expected"), [
    (lambda tmp: tmp, "is a folder"),
    (lambda tmp: tmp / "missing.jsonl", "does not exist"),
    (lambda tmp: write(tmp / "one.jsonl", 1), "holds out no record"),
])
def test_bad_paths_and_a_file_too_small_to_hold_out_are_refused(tmp_path, make, expected):
    with pytest.raises(FlopwiseError, match=expected):
        sft_split(PostTrainSection(data=[str(make(tmp_path))]), TOKENIZER, 64, seed=0)


def test_a_window_that_the_prompts_fill_is_refused_in_one_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    pair = {"prompt": "a question long enough to fill a short window", "chosen": "yes", "rejected": "no"}
    path.write_text("".join(json.dumps(pair) + "\n" for _ in range(20)), encoding="utf-8")
    with pytest.raises(FlopwiseError) as err:
        dpo_split(PostTrainSection(stage="dpo", data=[str(path)]), TOKENIZER, 16, seed=0)
    assert str(err.value) == ("no training preference pair keeps a reply token on both sides within model.seq_len=16 "
                              "(the prompts fill the window): raise model.seq_len, or give shorter prompts")
    assert len(dpo_split(PostTrainSection(stage="dpo", data=[str(path)]), TOKENIZER, 128, seed=0).heldout) == 1


def write_pairs(path: Path, equal: int, different: int) -> Path:
    """``equal`` pairs whose replies are the same, then ``different`` pairs whose replies differ."""
    pairs = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"a{i}"} for i in range(equal)]
    pairs += [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(different)]
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs), encoding="utf-8")
    return path


def test_pairs_whose_replies_are_all_equal_are_refused_naming_the_file_and_count(tmp_path):
    path = write_pairs(tmp_path / "same.jsonl", 12, 0)
    with pytest.raises(FlopwiseError) as err:
        dpo_split(PostTrainSection(stage="dpo", data=[str(path)]), TOKENIZER, 64, seed=0)
    assert str(err.value) == (f"preferences file '{path}': all 12 pairs have the same chosen and rejected reply, so "
                              "DPO has no preference to learn: give pairs whose replies differ")


def test_pairs_with_equal_replies_are_left_out_and_counted(tmp_path):
    """They carry no gradient (the margin is 0 whatever the weights): the others train, the line says how many."""
    path = write_pairs(tmp_path / "some.jsonl", 3, 17)
    split = dpo_split(PostTrainSection(stage="dpo", data=[str(path)]), TOKENIZER, 64, seed=0)
    assert len(split.train) + len(split.heldout) == 17 and split.equal == 3
    assert all(p.chosen.ids.tolist() != p.rejected.ids.tolist() for p in split.train + split.heldout)
    assert split.describe("preference pairs", 64).endswith("; 3 left out (the same chosen and rejected reply)")
    assert split.to_dict()["equal_pairs"] == 3
