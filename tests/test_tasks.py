"""The task engine: its scores against an independent full forward, the task format and its one-line refusals,
the metrics, `flopwise eval --tasks` and tasks scored during a run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flopwise.cli import main
from flopwise.data.tokenizer import byte_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.evaluate.tasks.engine import choice_loglikelihoods, evaluate_task
from flopwise.evaluate.tasks.metrics import bootstrap_interval, center, choice_correct
from flopwise.evaluate.tasks.resolve import check_run_tasks
from flopwise.evaluate.tasks.scoring import TaskModel, windows
from flopwise.evaluate.tasks.spec import Example, Task, read_task_file
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.rundir import read_metrics
from tests.helpers import TINY, config_with, run_error, train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def task_model() -> TaskModel:
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            seq_len=48))
    return TaskModel(model.eval(), tokenizer, CPU, torch.float32, batch_size=3)


def full_forward_loglikelihood(task_model: TaskModel, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) from one plain forward over the whole (left-truncated) text."""
    head, tail = task_model.encode_pair(context, continuation)
    whole = (head + tail)[-(task_model.max_length + 1):]
    with torch.no_grad():
        logits = task_model.model(torch.tensor([whole[:-1]]))[0][0, -len(tail):].float()
    log_probs = F.log_softmax(logits, dim=-1)
    target = torch.tensor(whole[-len(tail):])
    return float(log_probs.gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())


def test_loglikelihoods_with_shared_contexts_equal_a_full_forward(task_model):
    pairs = [("def f(x):", " return x"), ("def f(x):", " pass"), ("def f(x):", "\n    return x + 1"),
             ("a" * 90, " over the window"), ("", "starts the text"), ("trailing space ", "moves"),
             ("def f(x):", " return x")]
    got = task_model.loglikelihood(pairs)
    for (context, continuation), (score, greedy) in zip(pairs, got):
        expected, expected_greedy = full_forward_loglikelihood(task_model, context, continuation)
        assert score == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
    assert got[0] == got[-1]


def test_pairs_split_as_lm_eval_splits_them(task_model):
    encode = task_model.encode
    assert task_model.encode_pair("Question: ", "yes") == (encode("Question:"), encode(" yes"))
    assert task_model.encode_pair("", "abc") == ([task_model.tokenizer.eos_id], encode("abc"))
    assert task_model.encode_pair("x\n\n", "y") == (encode("x"), encode("\n\ny"))


def test_windows_predict_every_token_once_within_the_window():
    ids = list(range(100, 131))  # a prefix token then 30 tokens
    pairs = windows(ids, 1, 8)
    predicted = [token for _, continuation in pairs for token in continuation]
    assert predicted == ids[1:]
    assert windows(ids, 27, 8) == [(ids[22:27], ids[27:])]  # one that fits: its context cut on the left
    for context, continuation in pairs:
        assert 1 <= len(context) + len(continuation) - 1 <= 8
        assert ids[ids.index(context[-1]) + 1] == continuation[0]  # the context ends right before it


def test_rolling_loglikelihood_is_the_sum_over_the_text(task_model):
    text = "print('hello')\n" * 8  # longer than the 48-token window
    ids = [task_model.tokenizer.eos_id, *task_model.encode(text)]
    expected = 0.0
    for context, continuation in windows(ids, 1, task_model.max_length):
        expected += full_forward_loglikelihood(task_model, task_model.tokenizer.decode(context),
                                               task_model.tokenizer.decode(continuation))[0]
    assert task_model.loglikelihood_rolling([text])[0] == pytest.approx(expected, abs=1e-4)
    assert len(ids) - 1 > task_model.max_length
    # a continuation longer than the window is scored the same way after its context
    long_pair = ("x = 1\n", text)
    head, tail = task_model.encode_pair(*long_pair)
    by_windows = sum(task_model.loglikelihood_tokens([pair])[0][0] for pair in windows(head + tail, len(head), 48))
    assert task_model.loglikelihood([long_pair])[0][0] == pytest.approx(by_windows, abs=1e-6)


def test_generation_stops_at_until_and_is_greedy(task_model):
    context = "abc"
    out = task_model.generate(context, ["\n"], 12)
    ids = task_model.encode(context)
    with torch.no_grad():
        for _ in range(12):
            next_id = int(task_model.model(torch.tensor([ids]))[0][0, -1].argmax())
            ids.append(next_id)
    greedy = task_model.tokenizer.decode(ids[len(task_model.encode(context)):])
    assert greedy.split("\n")[0].startswith(out) and "\n" not in out


def test_accuracies_pick_by_raw_character_and_byte_normalized_scores():
    examples = [Example("q", ("ab", "abcdef"), 1), Example("q", ("é", "ee"), 0)]
    lls = [[-2.0, -3.0], [-2.1, -2.0]]
    correct = choice_correct(examples, lls)
    # raw picks 0 and 1; per character -1 vs -0.5 and -2.1 vs -1; per byte -1 vs -0.5 and -1.05 vs -1
    assert correct["acc"].tolist() == [0.0, 0.0]
    assert correct["acc_norm"].tolist() == [1.0, 0.0]
    assert correct["acc_bytes"].tolist() == [1.0, 0.0]
    lls = [[-2.0, -3.0], [-2.1, -2.2]]  # 'é' is one character of two bytes: -2.1 vs -1.1 per character, -1.05
    # vs -1.1 per byte
    correct = choice_correct(examples, lls)
    assert correct["acc_norm"].tolist() == [1.0, 0.0]
    assert correct["acc_bytes"].tolist() == [1.0, 1.0]


def test_centered_accuracy_and_its_bootstrap_interval():
    assert center(0.25, 0.25) == 0.0 and center(1.0, 0.25) == 1.0 and center(0.625, 0.25) == pytest.approx(0.5)
    values = np.array([1.0] * 60 + [0.0] * 40)
    low, high = bootstrap_interval(values, 0.25, seed=0)
    assert low < center(0.6, 0.25) < high
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.6 * 0.4 / 100) / 0.75, rel=0.2)
    assert bootstrap_interval(values, 0.25, seed=0) == (low, high)


def test_a_task_scored_end_to_end(task_model):
    examples = tuple(Example(f"x = {i}\n", (" y", " z", " w"), i % 3) for i in range(7))
    task = Task("toy", "choice", examples, "test")
    result = evaluate_task(task, task_model, seed=0)
    lls = choice_loglikelihoods(task, task_model)
    expected = np.mean([float(np.argmax(np.array(ll) / 2) == e.answer) for e, ll in zip(examples, lls)])
    assert result["acc_bytes"] == pytest.approx(expected)
    assert result["random"] == pytest.approx(1 / 3) and result["n"] == 7
    assert result["centered"] == pytest.approx((expected - 1 / 3) / (2 / 3))
    generated = Task("gen", "generate", (Example("abc", target="zzz"),), "test")
    assert evaluate_task(generated, task_model)["exact_match"] in (0.0, 1.0)


def write_lines(path, records) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")


def test_task_files_of_both_kinds_are_read(tmp_path):
    write_lines(tmp_path / "mc.jsonl", [{"context": "a", "choices": [" b", " c"], "answer": 1}, "",
                                        {"context": "d", "choices": [" e", " f", " g"], "answer": 0}])
    task = read_task_file(tmp_path / "mc.jsonl")
    assert task.name == "mc" and task.kind == "choice" and len(task.examples) == 2
    assert task.random_baseline == pytest.approx((1 / 2 + 1 / 3) / 2)
    write_lines(tmp_path / "gen.jsonl", [{"context": "2+2=", "target": "4", "until": [";"]}])
    task = read_task_file(tmp_path / "gen.jsonl")
    assert task.kind == "generate" and task.examples[0].until == (";",) and task.random_baseline == 0.0


def test_a_raw_line_separator_inside_a_json_string_does_not_split_the_record(tmp_path):
    path = tmp_path / "sep.jsonl"
    record = {"context": "first\u2028second", "choices": [" a", " b"], "answer": 0}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert read_task_file(path).examples[0].context == "first\u2028second"


@pytest.mark.parametrize("records, message", [
    ([], "has no examples"),
    ([{"choices": [" a", " b"], "answer": 0}], "line 1 has no field 'context'"),
    ([{"context": "x", "choices": [" a", " b"]}], "line 1 has no field 'answer'"),
    ([{"context": "x", "answer": 0}], "line 1 has no field 'choices'"),
    ([{"context": "x", "choices": [" a", " b"], "answer": 0}, {"context": "y", "choices": [" a", " b"], "answer": 2}],
     "line 2 field 'answer' is 2, out of range for 2 choices"),
    (["{not json"], "line 1 is not JSON"),
    ([{"context": "x", "choices": [" a", " b"], "answer": 0}, {"context": "y", "target": "z"}],
     "line 2 is a generate example after choice ones"),
])
def test_bad_task_files_are_refused_in_one_line(tmp_path, records, message):
    path = tmp_path / "bad.jsonl"
    write_lines(path, records)
    with pytest.raises(FlopwiseError, match=message) as error:
        read_task_file(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, text_folder):
    run = tmp_path_factory.mktemp("tasks") / "run"
    assert train("--data", str(text_folder), "--budget", "12steps", "--out", str(run), *TINY) == 0
    return run


def test_eval_tasks_writes_the_table_and_tasks_json(tiny_run, tmp_path, capsys):
    write_lines(tmp_path / "mine.jsonl", [{"context": "The ", "choices": ["cat", "dog"], "answer": i % 2}
                                          for i in range(5)])
    assert main(["eval", str(tiny_run), "--tasks", "builtin", str(tmp_path / "mine.jsonl"), "--limit", "20"]) == 0
    assert "written:" in capsys.readouterr().out
    result = json.loads((tiny_run / "tasks.json").read_text())
    # no Python code in this data: no docstring tasks
    assert {name: r["n"] for name, r in result["tasks"].items()} == {"next_line": 20, "rare_word": 20, "mine": 5}
    mine = result["tasks"]["mine"]
    assert mine["random"] == 0.5 and mine["low"] <= mine["centered"] <= mine["high"]
    assert result["seed"] == 0  # the run's


@pytest.mark.parametrize("records, message", [
    ([{"context": "x", "choices": [" a", " b"]}], "has no field 'answer'"),
    ([{"context": "x", "choices": [" a", " b"], "answer": 3}], "field 'answer' is 3, out of range"),
    ([], "has no examples"),
])
def test_eval_refuses_bad_task_files_in_one_line(tiny_run, tmp_path, capsys, records, message):
    path = tmp_path / "bad.jsonl"
    write_lines(path, records)
    assert message in run_error(capsys, ["eval", str(tiny_run), "--tasks", str(path)])
    assert not (tiny_run / "tasks.json").exists() or "bad" not in (tiny_run / "tasks.json").read_text()


def test_eval_refuses_an_unknown_task_name_before_loading(tiny_run, capsys):
    err = run_error(capsys, ["eval", str(tiny_run), "--tasks", "hellaswag"])
    assert "unknown task 'hellaswag'" in err and "next_line" in err
    assert "does not exist" in run_error(capsys, ["eval", str(tiny_run), "--tasks", "missing.jsonl"])
    assert "--limit 0 must be a positive" in run_error(capsys, ["eval", str(tiny_run), "--tasks", "builtin",
                                                                "--limit", "0"])
    assert "applies to --tasks" in run_error(capsys, ["eval", str(tiny_run), "--limit", "3"])


def test_docstring_tasks_are_refused_on_other_data(tiny_run, capsys):
    assert "needs the default corpus" in run_error(capsys, ["eval", str(tiny_run), "--tasks", "doc_to_name"])


def test_tasks_during_training_are_logged_at_each_evaluation_and_leave_training_alone(tmp_path, text_folder):
    plain, scored = tmp_path / "plain", tmp_path / "scored"
    assert train("--data", str(text_folder), "--budget", "8steps", "--out", str(plain), *TINY,
                 "--set", "train.eval_every=0.5") == 0
    assert train("--data", str(text_folder), "--budget", "8steps", "--out", str(scored), *TINY,
                 "--set", "train.eval_every=0.5", "--set", 'train.eval_tasks=["next_line"]',
                 "--set", "train.task_examples=12") == 0
    events = read_metrics(scored / "metrics.jsonl")
    evals = [e for e in events if e["event"] == "eval"]
    tasks = [e for e in events if e["event"] == "tasks"]
    assert [e["step"] for e in tasks] == [e["step"] for e in evals] and len(tasks) >= 3
    assert all(e["tasks"]["next_line"]["n"] == 12 and e["eval_seconds"] > 0 for e in tasks)
    assert tasks[-1]["p"] == 1.0
    train_losses = [[e["loss"] for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"]
                    for run in (plain, scored)]
    assert train_losses[0] == train_losses[1]  # scoring tasks does not touch the training's randomness


def test_unknown_eval_tasks_are_refused_before_any_data_is_read(tmp_path, capsys):
    err = run_error(capsys, ["train", "--data", str(tmp_path / "nowhere"), "--budget", "2steps", "--out",
                             str(tmp_path / "r"), *TINY, "--set", 'train.eval_tasks=["nope"]'])
    assert "train.eval_tasks: unknown task 'nope'" in err
    assert not (tmp_path / "r").exists()


def test_tasks_during_an_fsdp_run_are_refused_in_one_line():
    config = config_with([], 'train.eval_tasks=["next_line"]', "train.parallel=fsdp")
    with pytest.raises(FlopwiseError, match="cannot be scored during an FSDP run") as error:
        check_run_tasks(config, distributed=True)
    assert "\n" not in str(error.value)
    check_run_tasks(config, distributed=False)  # one process holds the whole model
    check_run_tasks(config_with([], "train.parallel=fsdp"), distributed=True)  # no tasks, nothing to refuse
