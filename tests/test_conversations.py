"""Chat JSONL readers: the three conversation formats, preference pairs, and one-line errors for bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flopwise.errors import FlopwiseError
from flopwise.posttrain.conversations import Conversation, Message, PreferencePair, read_conversations, read_preferences

SYSTEM = "You are terse."
EXPECTED = (Message("system", SYSTEM), Message("user", "Add 2 and 3.\n\nAnswer with a number."),
            Message("assistant", "5"))


def write(folder: Path, name: str, *lines: object) -> Path:
    """A JSONL file; dicts and lists are dumped, strings are written as they are (blank or broken lines)."""
    path = folder / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def one_line_error(read, path: Path) -> str:
    with pytest.raises(FlopwiseError) as caught:
        read(path)
    message = str(caught.value)
    assert "\n" not in message and f"'{path}'" in message
    return message


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "Add 2 and 3.\n\nAnswer with a number."},
                  {"role": "assistant", "content": "5"}]},
    {"conversations": [{"from": "system", "value": SYSTEM},
                       {"from": "human", "value": "Add 2 and 3.\n\nAnswer with a number."},
                       {"from": "gpt", "value": "5"}]},
    {"system": SYSTEM, "conversations": [{"from": "human", "value": "Add 2 and 3.\n\nAnswer with a number."},
                                         {"from": "gpt", "value": "5"}]},
    {"system": SYSTEM, "instruction": "Add 2 and 3.", "input": "Answer with a number.", "output": "5"},
], ids=["openai", "sharegpt", "sharegpt-record-system", "alpaca"])
def test_equivalent_records_in_each_format_give_the_same_conversation(tmp_path, record):
    path = write(tmp_path, "chat.jsonl", record)
    assert read_conversations(path) == [Conversation(EXPECTED, str(path))]


@pytest.mark.parametrize("speaker, role", [("human", "user"), ("user", "user"), ("gpt", "assistant"),
                                           ("assistant", "assistant"), ("chatgpt", "assistant"),
                                           ("bing", "assistant"), ("bard", "assistant"), ("model", "assistant")])
def test_sharegpt_speakers_map_to_chat_roles(tmp_path, speaker, role):
    other = "gpt" if role == "user" else "human"
    turns = [{"from": speaker, "value": "a"}, {"from": other, "value": "b"}]
    [conversation] = read_conversations(write(tmp_path, "s.jsonl", {"conversations": turns}))
    assert conversation.messages[0].role == role


def test_alpaca_without_input_is_the_instruction_alone_and_extra_keys_are_ignored(tmp_path):
    path = write(tmp_path, "a.jsonl", {"instruction": "Say hi.", "output": "hi", "id": 7},
                 {"instruction": "Say hi.", "input": " ", "output": "hi"},
                 {"instruction": "Say hi.", "input": None, "output": "hi", "system": ""})
    expected = (Message("user", "Say hi."), Message("assistant", "hi"))
    assert [c.messages for c in read_conversations(path)] == [expected] * 3


def test_format_is_detected_per_file(tmp_path):
    openai = write(tmp_path, "o.jsonl", {"messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"}]})
    alpaca = write(tmp_path, "a.jsonl", {"instruction": "q", "output": "a"})
    sharegpt = write(tmp_path, "s.jsonl", {"conversations": [{"from": "human", "value": "q"},
                                                             {"from": "gpt", "value": "a"}]})
    expected = (Message("user", "q"), Message("assistant", "a"))
    for path in (openai, alpaca, sharegpt):
        assert read_conversations(path) == [Conversation(expected, str(path))]


def test_multi_turn_order_is_kept_and_blank_lines_crlf_and_a_bom_are_tolerated(tmp_path):
    turns = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"},
             {"role": "user", "content": "3"}, {"role": "assistant", "content": "4"}]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"messages": turns}).encode() + b"\r\n\r\n  \n"
                     + json.dumps({"messages": turns[:2]}).encode())
    conversations = read_conversations(path)
    assert [m.content for m in conversations[0].messages] == ["1", "2", "3", "4"]
    assert len(conversations) == 2


# ---------------------------------------------------------------- bad conversations


USER = {"role": "user", "content": "q"}
REPLY = {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("lines, expected", [
    ([{"messages": [USER]}], "line 1 field 'messages' has no assistant turn with text"),
    (["", {"messages": [USER, {"role": "assistant", "content": "  "}]}], "line 2 field 'messages' has no assistant"),
    ([{"messages": [USER, {"role": "bot", "content": "a"}]}],
     "line 1 field 'messages[1].role' is 'bot': use system, user or assistant"),
    ([{"messages": [USER, {"role": "system", "content": "s"}, REPLY]}],
     "line 1 field 'messages[1].role' is 'system': a system message may only come first"),
    ([{"messages": [USER, {"role": "tool\nx", "content": "a"}]}], "field 'messages[1].role' is 'tool\\nx'"),
    ([{"messages": [USER, {"content": "a"}]}], "line 1 field 'messages[1].role' is missing"),
    ([{"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}],
     "line 1 field 'messages[1].content' is a JSON array: give the text as a string"),
    ([{"messages": []}], "line 1 field 'messages' is an empty list"),
    ([{"messages": [USER, REPLY]}, {"instruction": "q", "output": "a"}],
     "line 2 field 'messages' is missing: line 1 is OpenAI-style 'messages'"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "x"}]}],
     "line 1 field 'conversations[1].from' is 'observation': use system, human or user, gpt"),
    ([{"system": "s", "conversations": [{"from": "system", "value": "t"}, {"from": "gpt", "value": "a"}]}],
     "line 1 field 'system' and 'conversations[0]' both give a system prompt"),
    ([{"instruction": "q", "output": ""}], "line 1 field 'output' is empty"),
    ([{"instruction": "q"}], "line 1 field 'output' is missing"),
    ([{"instruction": "", "output": "a"}], "line 1 field 'instruction' is empty"),
    ([{"instruction": "q", "input": 3, "output": "a"}], "line 1 field 'input' is a JSON number"),
    ([{"prompt": "q", "completion": "a"}],
     ("line 1 has keys 'prompt', 'completion', which match no known format: use OpenAI-style 'messages' "
      "(role/content), ShareGPT 'conversations' (from/value) or Alpaca 'instruction'/'input'/'output'")),
    (["{}"], "line 1 is an empty object: use OpenAI-style 'messages'"),
    (['{"messages": [}'], "line 1 is not valid JSON (Expecting value at column 15)"),
    (["[1, 2]"], "line 1 is a JSON array, not an object: write one JSON object per line"),
], ids=["no-assistant", "blank-assistant", "unknown-role", "late-system", "role-newline", "missing-role",
        "content-parts", "empty-messages", "mixed-formats", "tool-turn", "two-systems", "empty-output",
        "missing-output", "empty-instruction", "input-number", "unknown-format", "empty-object", "not-json",
        "array"])
def test_bad_conversations_give_one_line_naming_file_line_and_field(tmp_path, lines, expected):
    path = write(tmp_path, "bad.jsonl", *lines)
    assert expected in one_line_error(read_conversations, path)


def test_an_empty_file_has_no_conversations(tmp_path):
    path = write(tmp_path, "empty.jsonl", "", "   ")
    message = one_line_error(read_conversations, path)
    assert message.startswith(f"conversations file '{path}' has no conversations: write one JSON object per line")


def test_many_unknown_keys_are_counted_not_all_listed(tmp_path):
    path = write(tmp_path, "k.jsonl", {f"key{i}": i for i in range(12)})
    assert "'key7' and 4 more, which match no known format" in one_line_error(read_conversations, path)


def test_undecodable_and_missing_files_are_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"messages": [USER, REPLY]}).encode() + b"\n" + '{"x": "café"}'.encode("latin-1"))
    assert "line 2 is not UTF-8 (byte 0xe9 at column 11): save the file as UTF-8" in one_line_error(
        read_conversations, path)
    missing = tmp_path / "nope.jsonl"
    assert "could not be read: no such file or directory" in one_line_error(read_conversations, missing)


# ---------------------------------------------------------------- preference pairs


def test_preference_strings_make_a_one_turn_prompt(tmp_path):
    path = write(tmp_path, "p.jsonl", {"prompt": "2+3?", "chosen": "5", "rejected": "6"})
    assert read_preferences(path) == [PreferencePair((Message("user", "2+3?"),), "5", "6", str(path))]


def test_preference_prompt_may_be_messages_and_replies_may_continue_it(tmp_path):
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "2+3?"}]
    path = write(tmp_path, "p.jsonl", {"prompt": prompt, "chosen": "5", "rejected": "6"},
                 {"prompt": prompt, "chosen": [{"role": "assistant", "content": "5"}],
                  "rejected": [{"role": "assistant", "content": "6"}]})
    expected = PreferencePair((Message("system", SYSTEM), Message("user", "2+3?")), "5", "6", str(path))
    assert read_preferences(path) == [expected, expected]


def test_preference_whole_conversations_share_the_prompt_and_differ_in_the_last_reply(tmp_path):
    shared = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "2+3?"}]
    path = write(tmp_path, "p.jsonl", {"chosen": shared + [{"role": "assistant", "content": "5"}],
                                       "rejected": shared + [{"role": "assistant", "content": "6"}], "score": 1})
    [pair] = read_preferences(path)
    assert pair.prompt == (Message("user", "hi"), Message("assistant", "hello"), Message("user", "2+3?"))
    assert (pair.chosen, pair.rejected) == ("5", "6")


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "q", "chosen": "", "rejected": "b"},
     "line 1 field 'chosen' is empty: a preference pair needs a chosen reply"),
    ({"prompt": "q", "chosen": "a", "rejected": " "},
     "line 1 field 'rejected' is empty: a preference pair needs a rejected reply"),
    ({"prompt": "q", "chosen": "a"},
     "line 1 has keys 'prompt', 'chosen': a preference pair needs 'chosen' and 'rejected'"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "line 1 field 'prompt' is empty"),
    ({"prompt": "q", "chosen": 1, "rejected": "b"}, "line 1 field 'chosen' is a JSON number"),
    ({"chosen": [USER, REPLY], "rejected": [{"role": "user", "content": "other"}, REPLY]},
     "line 1 field 'rejected' does not share the prompt of 'chosen'"),
    ({"chosen": [USER, REPLY], "rejected": [USER, REPLY, USER]},
     "line 1 field 'rejected' ends with a user turn: it must end with the assistant reply"),
    ({"chosen": [REPLY], "rejected": [{"role": "assistant", "content": "b"}]},
     "line 1 field 'chosen' has no user turn before the replies"),
    ({"chosen": [USER, {"role": "human", "content": "a"}], "rejected": [USER, REPLY]},
     "line 1 field 'chosen[1].role' is 'human': use system, user or assistant"),
    ({"prompt": [USER], "chosen": [{"role": "system", "content": "s"}, REPLY], "rejected": "b"},
     "line 1 field 'chosen[0].role' is 'system': a system message may only come first"),
], ids=["empty-chosen", "empty-rejected", "no-rejected", "empty-prompt", "chosen-number", "other-prefix",
        "ends-with-user", "no-user", "sharegpt-role", "system-after-prompt"])
def test_bad_preferences_give_one_line_naming_file_line_and_field(tmp_path, record, expected):
    path = write(tmp_path, "bad.jsonl", record)
    assert expected in one_line_error(read_preferences, path)


def test_an_empty_preferences_file_has_no_pairs(tmp_path):
    path = write(tmp_path, "empty.jsonl", "")
    assert "has no preference pairs" in one_line_error(read_preferences, path)
