"""`flopwise sft` and `flopwise dpo` end to end on a tiny pretrained run: the held-out assistant loss falls, DPO
meters its reference, both resume bit for bit, the export chats in transformers as `flopwise chat` does, and bad
input stops with one line, exit code 2 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flopwise.cli import main
from flopwise.config import load_run_config
from flopwise.data.tokenizer import Tokenizer
from flopwise.model.flops import flops_per_token, forward_flops_per_token
from flopwise.posttrain.conversations import Message
from flopwise.posttrain.template import IM_END, IM_START, render
from flopwise.rundir import planned_model_config, read_metrics
from flopwise.stages import stage_class
from tests.helpers import losses, run_error, serving

pytestmark = pytest.mark.slow  # real runs: a pretrain, then sft and dpo from it

WORDS = ("apple", "river", "stone", "cloud", "maple", "ember", "frost", "grove", "harbor", "island", "jade", "kelp")
SMALL = ["--set", "optim.batch_size=4", "--set", "train.log_every=1", "--set", "train.eval_every=0.5",
         "--set", "optim.lr=3e-3", "--set", "optim.muon_lr=0.02"]


def conversations(count: int = 48) -> list[dict]:
    """Short OpenAI-style conversations: spell a word backwards (a rule a tiny byte model learns a little of)."""
    records = []
    for i in range(count):
        word = WORDS[i % len(WORDS)] + str(i // len(WORDS))
        messages = [{"role": "user", "content": f"reverse {word}"}, {"role": "assistant", "content": word[::-1]}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        records.append({"messages": messages})
    return records


def pairs(count: int = 48) -> list[dict]:
    return [{"prompt": f"reverse {w}", "chosen": w[::-1], "rejected": w}
            for w in (WORDS[i % len(WORDS)] + str(i // len(WORDS)) for i in range(count))]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    return {"sft": write_jsonl(folder / "chats.jsonl", conversations()),
            "dpo": write_jsonl(folder / "pairs.jsonl", pairs())}


def sft(base: Path, out: Path, data: Path, *args: str) -> int:
    return main(["sft", "--init-from", str(base), "--data", str(data), "--out", str(out), *SMALL, *args])


@pytest.fixture(scope="module")
def sft_run(base, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "run"
    assert sft(base, out, data["sft"], "--budget", "24steps") == 0
    return out


def evals(run: Path) -> list[dict]:
    return [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"]


def test_sft_lowers_the_heldout_assistant_loss_and_writes_a_chat_model(sft_run, data):
    first, last = evals(sft_run)[0], evals(sft_run)[-1]
    assert first["step"] == 0 and last["step"] == 24 and last["p"] == pytest.approx(1.0)
    assert last["val_loss"] < first["val_loss"]
    assert last["heldout_tokens"] == first["heldout_tokens"] > 0
    assert set(last["domains"]) == {str(data["sft"])}  # the loss per source: one file here
    config = json.loads((sft_run / "final" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    generation = json.loads((sft_run / "final" / "generation_config.json").read_text())
    tokenizer = Tokenizer.load(sft_run / "tokenizer.json")
    assert generation["eos_token_id"] == [tokenizer.eos_id, tokenizer.encode_batch([IM_END])[0][0]]
    assert planned_model_config(sft_run).vocab_size == tokenizer.vocab_size == 259  # 257 bytes + 2 chat tokens


def test_sft_summary_reports_start_and_end(base, data, tmp_path, capsys):
    assert sft(base, tmp_path / "s", data["sft"], "--budget", "4steps") == 0
    out = capsys.readouterr().out
    assert "held-out assistant-token loss:" in out and "(start) ->" in out


def test_post_training_starts_from_its_own_rates_unless_set(base, data, tmp_path):
    out = tmp_path / "rates"
    assert main(["sft", "--init-from", str(base), "--data", str(data["sft"]), "--out", str(out), "--budget", "1steps",
                 "--set", "optim.muon_lr=0.02"]) == 0
    optim = load_run_config(out).optim
    assert (optim.lr, optim.muon_lr) == (stage_class("sft").defaults["optim.lr"], 0.02)


def test_sft_without_packing_fills_one_conversation_per_row(base, data, sft_run, tmp_path):
    """Packing changes the batches (so the curve), not the held-out scoring of the start."""
    out = tmp_path / "nopack"
    assert sft(base, out, data["sft"], "--budget", "6steps", "--no-pack") == 0
    assert evals(out)[0]["val_loss"] == pytest.approx(evals(sft_run)[0]["val_loss"], rel=1e-6)
    assert losses(out)[1][1] != pytest.approx(losses(sft_run)[1][1], rel=1e-6)


def test_a_conversation_longer_than_the_window_is_cut_and_counted(base, data, tmp_path):
    long = conversations(8) + [{"messages": [{"role": "user", "content": "x" * 20},
                                             {"role": "assistant", "content": "y" * 200}]}]
    out = tmp_path / "long"
    assert sft(base, out, write_jsonl(tmp_path / "long.jsonl", long), "--budget", "2steps",
               "--set", "posttrain.heldout=0.2") == 0
    counts = json.loads((out / "plan.json").read_text())["posttrain"]
    assert counts["train_truncated"] + counts["heldout_truncated"] == 1


@pytest.fixture(scope="module")
def dpo_run(sft_run, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dpo") / "run"
    assert main(["dpo", "--init-from", str(sft_run), "--data", str(data["dpo"]), "--out", str(out),
                 "--budget", "12steps", *SMALL, "--set", "optim.lr=1e-3", "--set", "optim.muon_lr=0.005"]) == 0
    return out


def test_dpo_raises_preference_accuracy_and_meters_the_reference(dpo_run, sft_run):
    first, last = evals(dpo_run)[0], evals(dpo_run)[-1]
    assert first["reward_accuracy"] == 0.0 and first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert last["reward_margin"] > 0 and last["preference_accuracy"] >= first["preference_accuracy"]
    plan = json.loads((dpo_run / "plan.json").read_text())
    cfg = planned_model_config(dpo_run)
    rows = 2 * 4 * cfg.seq_len  # 4 pairs a step, chosen and rejected rows
    assert plan["flops_per_step"] == pytest.approx(rows * (flops_per_token(cfg) + forward_flops_per_token(cfg)))
    last_train = [e for e in read_metrics(dpo_run / "metrics.jsonl") if e["event"] == "train"][-1]
    assert last_train["flops"] == pytest.approx(12 * plan["flops_per_step"])


def test_a_flop_budget_ends_dpo_exactly_at_its_last_step(sft_run, data, dpo_run, tmp_path):
    per_step = json.loads((dpo_run / "plan.json").read_text())["flops_per_step"]
    out = tmp_path / "flops"
    assert main(["dpo", "--init-from", str(sft_run), "--data", str(data["dpo"]), "--out", str(out),
                 "--set", f"budget.flops={5 * per_step!r}", *SMALL]) == 0
    assert losses(out)[-1][0] == 5


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_resume_after_an_interruption_is_bit_for_bit(stage, base, sft_run, data, tmp_path):
    start = base if stage == "sft" else sft_run
    common = [stage, "--init-from", str(start), "--data", str(data[stage]), "--budget", "10steps", *SMALL]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*common, "--out", str(whole)]) == 0
    assert main([*common, "--out", str(parts), "--stop-after", "4steps"]) == 0
    assert main([stage, "--resume", str(parts)]) == 0
    assert losses(parts) == losses(whole)
    assert [e["val_loss"] for e in evals(parts)] == [e["val_loss"] for e in evals(whole)]
    a, b = load_file(str(whole / "final" / "model.safetensors")), load_file(str(parts / "final" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_sft_starts_from_a_hugging_face_folder(base, data, tmp_path):
    folder = tmp_path / "hf"
    assert main(["export", str(base), "--to", str(folder)]) == 0
    out = tmp_path / "from-hf"
    assert sft(folder, out, data["sft"], "--budget", "3steps", "--set", "model.seq_len=96") == 0
    assert planned_model_config(out).vocab_size == 259
    assert evals(out)[-1]["val_loss"] < evals(out)[0]["val_loss"]


def test_lisa_applies_and_data_methods_are_refused(base, data, tmp_path, capsys):
    assert sft(base, tmp_path / "lisa", data["sft"], "--budget", "3steps", "--method", "lisa") == 0
    err = run_error(capsys, ["sft", "--init-from", str(base), "--data", str(data["sft"]), "--budget", "3steps",
                             "--out", str(tmp_path / "r"), "--set", "methods.use=reweight"])
    assert "'reweight' applies to the pretrain stage only, not to sft: drop it (8bit, " in err
    assert not (tmp_path / "r").exists()


def test_lora_on_a_run_that_already_has_the_chat_tokens(sft_run, data, tmp_path):
    assert main(["sft", "--init-from", str(sft_run), "--data", str(data["sft"]), "--out", str(tmp_path / "l"),
                 "--budget", "3steps", "--method", "lora", *SMALL]) == 0


BAD_CONVERSATIONS = {
    "empty": ("", "has no conversations"),
    "unknown format": ('{"question": "hi", "answer": "yo"}\n', "question"),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "hi"}]}\n', "assistant"),
    "bad role": ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
                 "robot"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONVERSATIONS))
def test_bad_sft_data_is_one_line_exit_2_and_nothing_written(case, base, tmp_path, capsys):
    text, expected = BAD_CONVERSATIONS[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    err = run_error(capsys, ["sft", "--init-from", str(base), "--data", str(path), "--budget", "2steps",
                             "--out", str(out)])
    assert str(path) in err and expected in err
    assert not out.exists()


def test_dpo_with_an_empty_chosen_is_refused(sft_run, tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "", "rejected": "no"}])
    err = run_error(capsys, ["dpo", "--init-from", str(sft_run), "--data", str(path), "--budget", "2steps",
                             "--out", str(tmp_path / "out")])
    assert str(path) in err and "chosen" in err and "line 1" in err
    assert not (tmp_path / "out").exists()


def test_lora_refuses_a_tokenizer_without_room_for_the_chat_tokens(base, data, tmp_path, capsys):
    err = run_error(capsys, ["sft", "--init-from", str(base), "--data", str(data["sft"]), "--budget", "2steps",
                             "--out", str(tmp_path / "out"), "--method", "lora"])
    assert "no room for the chat tokens" in err and "(methods.use 'lora' freezes it)" in err
    assert not (tmp_path / "out").exists()


def test_sft_needs_a_finished_starting_model(tmp_path, capsys):
    err = run_error(capsys, ["sft", "--budget", "2steps", "--out", str(tmp_path / "out")])
    assert "--init-from" in err


def test_transformers_template_and_greedy_generate_match_flopwise_chat(sft_run, capsys):
    transformers = pytest.importorskip("transformers")
    final = sft_run / "final"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    model = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    history = [Message("system", "Be brief."), Message("user", "reverse apple0"), Message("assistant", "0elppa"),
               Message("user", "reverse stone1")]
    as_dicts = [{"role": m.role, "content": m.content} for m in history]
    ids = hf_tokenizer.apply_chat_template(as_dicts, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    ours = render(Tokenizer.load(sft_run / "tokenizer.json"), history, add_generation_prompt=True)[0]
    assert list(ids) == ours
    prompt = [Message("user", "reverse river3")]
    prompt_ids = render(Tokenizer.load(sft_run / "tokenizer.json"), prompt, add_generation_prompt=True)[0]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=20)
    reply = out[0, len(prompt_ids):].tolist()
    stops = set(model.generation_config.eos_token_id)
    reply = reply[:next((i for i, t in enumerate(reply) if t in stops), len(reply))]
    capsys.readouterr()
    assert main(["chat", str(sft_run), "--temperature", "0", "--prompt", "reverse river3", "--max-tokens", "20"]) == 0
    printed = capsys.readouterr().out
    assert printed == hf_tokenizer.decode(reply) + "\n"
    assert IM_START not in printed


def test_the_openai_client_streams_what_flopwise_chat_replies(sft_run, capsys):
    openai = pytest.importorskip("openai", reason="the serve test needs the openai client: pip install -e '.[test]'")
    from flopwise.evaluate.load import load_run_model
    from flopwise.serve.app import ServeSettings
    from flopwise.serve.engine import Engine

    assert main(["chat", str(sft_run), "--temperature", "0", "--prompt", "reverse river3", "--max-tokens", "20"]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = load_run_model(sft_run, torch.device("cpu"))
    with serving(Engine(model, tokenizer, 2, 8), ServeSettings("sft", chat=True)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "reverse river3"}],
                                                temperature=0, max_tokens=20, stream=True)
        chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) + "\n" == printed and len(pieces) > 1  # streamed piece by piece
    assert chunks[-1].usage.completion_tokens == len(tokenizer.encode_batch(["".join(pieces)])[0])
