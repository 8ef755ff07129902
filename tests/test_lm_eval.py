"""lm-eval and flopwise agree: one local lm-eval task folder (YAMLs over JSON Lines) scores the same per example
through flopwise's own engine (the YAML read by flopwise/evaluate/tasks/lm_eval_yaml.py), through lm-eval with
the flopwise adapter (flopwise/evaluate/lm_eval_model.py) and through lm-eval's ``hf`` model on the exported
folder; ``python -m flopwise.lm_eval`` runs it offline; what the reader does not support is refused in one line."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from flopwise.cli import main
from flopwise.errors import FlopwiseError
from flopwise.evaluate.lm_eval_model import FlopwiseLM
from flopwise.evaluate.load import load_final_model
from flopwise.evaluate.tasks.engine import choice_loglikelihoods, evaluate_task
from flopwise.evaluate.tasks.lm_eval_yaml import read_lm_eval_folder, read_lm_eval_task
from flopwise.evaluate.tasks.scoring import TaskModel
from tests.helpers import train_bpe_run

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # everything here is local
os.environ.update(OFFLINE)
TOLERANCE = 1e-4
TASKS = ["fw_choice", "fw_generate", "fw_rolling"]

CHOICE_DOCS = [  # templates, a double space for regex_replace, a trailing space, a label given as text,
    # an empty context (scored after end-of-text) and a context longer than the model's 64 tokens
    {"question": "The keyword that defines a function is", "choices": ["def", "class", "lambda"], "label": 0},
    {"question": "A loop that  repeats while a condition holds is a", "choices": ["while loop", "for loop"],
     "label": 1},
    {"question": "To leave a loop early, use the statement ", "choices": ["break", "continue", "pass"], "label": 0},
    {"question": "An object's attributes live in its", "choices": ["namespace", "module", "file"],
     "label": "namespace"},
    {"question": "Exceptions are raised with", "choices": ["raise", "throw"], "label": 0},
    {"question": "", "choices": ["import", "export"], "label": 0},
    {"question": "The with statement wraps the execution of a block with methods of a context manager. " * 3
     + "The method called on entry is", "choices": ["__enter__", "__exit__"], "label": 0},
]
GENERATE_DOCS = [{"prompt": "The for statement is used to", "answer": "iterate"},
                 {"prompt": "A class definition creates", "answer": "a class"},
                 {"prompt": "def f(x):\n    return", "answer": "x"}]
ROLLING_DOCS = [{"text": "The import statement finds a module, loads and initializes it, and binds a name "
                         "to it in the local namespace. " * 5},
                {"text": "Short text."}]


def write_task(folder: Path, name: str, fields: dict, records: list[dict], extra: str = "") -> Path:
    """``name``.yaml (``fields`` and raw ``extra`` lines) over ``name``.jsonl (``records``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(fields, sort_keys=False) + extra, encoding="utf-8")
    return path


def choice_fields(folder: Path, name: str = "fw_choice") -> dict:
    return {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder / f"{name}.jsonl")}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{question | regex_replace('  +', ' ')}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "label",
            "metric_list": [{"metric": metric, "aggregation": "mean", "higher_is_better": True}
                            for metric in ("acc", "acc_norm")]}


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    """A local lm-eval task folder: multiple choice, generation (data_files a plain path: the split "train")
    and a rolling log-likelihood task (lm-eval only)."""
    folder = tmp_path_factory.mktemp("lm_eval") / "my_tasks"
    write_task(folder, "fw_choice", choice_fields(folder), CHOICE_DOCS)
    write_task(folder, "fw_generate", {
        "task": "fw_generate", "dataset_path": "json",
        "dataset_kwargs": {"data_files": str(folder / "fw_generate.jsonl")},
        "test_split": "train", "output_type": "generate_until", "doc_to_text": "prompt",
        "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 16}},
        GENERATE_DOCS)
    write_task(folder, "fw_rolling", {
        "task": "fw_rolling", "dataset_path": "json",
        "dataset_kwargs": {"data_files": str(folder / "fw_rolling.jsonl")},
        "test_split": "train", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text"},
        ROLLING_DOCS)
    return folder


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """lm-eval loads the JSON through ``datasets``, whose cache goes to a temporary folder here."""
    import datasets.config

    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("hf_datasets")
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        patch.setenv("HF_DATASETS_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_folder) -> Path:
    """A tiny real run with a BPE tokenizer (context and continuation then split inside words), in fp32."""
    return train_bpe_run(tmp_path_factory.mktemp("lm_eval_run") / "run", text_folder, "train.precision=fp32")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_export") / "hf"
    assert main(["export", str(run), "--to", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def task_model(run) -> TaskModel:
    model, tokenizer = load_final_model(run, torch.device("cpu"))
    return TaskModel(model, tokenizer, torch.device("cpu"), torch.float32)


def evaluate_with(model: str, model_args: str, folder: Path) -> dict:
    results = simple_evaluate(model=model, model_args=model_args, tasks=TASKS, device="cpu", log_samples=True,
                              task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    responses = {task: {s["doc_id"]: [r[0] for r in s["resps"]] for s in samples}
                 for task, samples in results["samples"].items()}
    return {"results": results["results"], "responses": responses}


@pytest.fixture(scope="module")
def through_adapter(run, task_folder) -> dict:
    return evaluate_with("flopwise", f"run={run}", task_folder)


@pytest.fixture(scope="module")
def through_hf(exported, task_folder) -> dict:
    return evaluate_with("hf", f"pretrained={exported},dtype=float32", task_folder)


# ---------------------------------------------------------------- agreement


@pytest.mark.slow
def test_choice_loglikelihoods_agree_through_engine_adapter_and_hf(task_folder, task_model, through_adapter,
                                                                  through_hf):
    task = read_lm_eval_task(task_folder / "fw_choice.yaml")
    engine = choice_loglikelihoods(task, task_model)
    adapter, hf = through_adapter["responses"]["fw_choice"], through_hf["responses"]["fw_choice"]
    assert len(engine) == len(CHOICE_DOCS) == len(adapter) == len(hf)
    for doc_id, ours in enumerate(engine):
        assert len(ours) == len(adapter[doc_id]) == len(hf[doc_id]) == len(CHOICE_DOCS[doc_id]["choices"])
        for mine, (lm_eval_ll, _), (hf_ll, _) in zip(ours, adapter[doc_id], hf[doc_id]):
            assert abs(mine - lm_eval_ll) < TOLERANCE and abs(mine - hf_ll) < TOLERANCE, (doc_id, mine, hf_ll)
    ours = evaluate_task(task, task_model)
    for metric in ("acc", "acc_norm"):
        assert through_adapter["results"]["fw_choice"][f"{metric},none"] == pytest.approx(ours[metric])
        assert through_hf["results"]["fw_choice"][f"{metric},none"] == pytest.approx(ours[metric])


def test_flopwise_eval_reads_an_lm_eval_task_folder(run, task_folder, tmp_path, through_adapter):
    folder = tmp_path / "tasks"
    folder.mkdir()
    shutil.copy(task_folder / "fw_choice.yaml", folder)
    (folder / "_template.yaml").write_text("output_type: multiple_choice\n")  # included by others, no task
    assert main(["eval", str(run), "--tasks", str(folder)]) == 0
    result = json.loads((run / "tasks.json").read_text())["tasks"]
    assert list(result) == ["fw_choice"] and result["fw_choice"]["n"] == len(CHOICE_DOCS)
    assert result["fw_choice"]["acc_norm"] == pytest.approx(through_adapter["results"]["fw_choice"]["acc_norm,none"])


@pytest.mark.slow
def test_rolling_loglikelihoods_agree_with_hf_over_several_windows(task_model, through_adapter, through_hf):
    texts = [doc["text"] for doc in ROLLING_DOCS]
    assert len(task_model.encode(texts[0])) > 2 * task_model.max_length  # three windows or more
    engine = task_model.loglikelihood_rolling(texts)
    adapter, hf = through_adapter["responses"]["fw_rolling"], through_hf["responses"]["fw_rolling"]
    for doc_id, mine in enumerate(engine):
        assert abs(mine - adapter[doc_id][0]) < TOLERANCE and abs(mine - hf[doc_id][0]) < TOLERANCE


@pytest.mark.slow
def test_greedy_generations_agree_with_hf(task_folder, task_model, through_adapter, through_hf):
    task = read_lm_eval_task(task_folder / "fw_generate.yaml")
    assert task.max_new_tokens == 16 and all(e.until == ("\n", ".") for e in task.examples)
    engine = [task_model.generate(e.context, e.until, task.max_new_tokens) for e in task.examples]
    adapter, hf = through_adapter["responses"]["fw_generate"], through_hf["responses"]["fw_generate"]
    assert [adapter[i][0] for i in range(len(engine))] == [hf[i][0] for i in range(len(engine))] == engine
    assert "" in engine  # one generation ends at once, at an until string


@pytest.mark.slow
def test_adapter_calls_and_refusals(run):
    lm = FlopwiseLM(run=str(run), device="cpu", batch_size="auto", max_gen_toks=5)
    assert lm.max_length == 64 and lm.tok_decode(lm.tok_encode("a def")) == "a def"
    request = Instance("generate_until", {}, ("The for statement", {"until": ["\n"]}), 0)
    [short] = lm.generate_until([request])
    assert len(lm.tok_encode(short)) <= 5  # max_gen_toks from the model arguments when the request has none
    with pytest.raises(FlopwiseError, match="decodes greedily"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"do_sample": True, "temperature": 0.7}), 0)])
    with pytest.raises(FlopwiseError, match="num_beams"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"num_beams": 4}), 0)])
    with pytest.raises(FlopwiseError, match="run=runs/NAME"):
        FlopwiseLM()


# ---------------------------------------------------------------- the reader means what lm-eval means


def test_reader_builds_the_requests_lm_eval_builds(task_folder):
    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    for name in ("fw_choice", "fw_generate"):
        ours = read_lm_eval_task(task_folder / f"{name}.yaml")
        theirs = manager.load([name])["tasks"][name]
        docs = list(theirs.eval_docs)
        assert ours.name == name and len(ours.examples) == len(docs)
        for index, (example, doc) in enumerate(zip(ours.examples, docs)):
            context = theirs.fewshot_context(doc=doc, num_fewshot=0)
            requests = theirs.construct_requests(doc=doc, ctx=context, metadata=(name, index, 1))
            if ours.kind == "choice":
                assert [r.args for r in requests] == [(example.context, example.delimiter + c) for c in example.choices]
                gold = theirs.doc_to_target(doc)
                assert example.answer == (gold if isinstance(gold, int) else doc["choices"].index(gold))
            else:
                assert requests.args[0] == example.context and tuple(requests.args[1]["until"]) == example.until
                assert str(theirs.doc_to_target(doc)) == example.target
    choice = read_lm_eval_task(task_folder / "fw_choice.yaml")
    assert choice.examples[3].answer == 0 and choice.examples[5].context == ""  # a label given as text; no context
    assert choice.examples[1].context == "A loop that repeats while a condition holds is a"  # regex_replace


def test_relative_data_files_are_taken_from_the_current_directory_as_lm_eval_takes_them(tmp_path, monkeypatch):
    fields = {**choice_fields(tmp_path), "dataset_kwargs": {"data_files": {"test": "data/fw_rel.jsonl"}}}
    fields["task"] = "fw_rel"
    write_task(tmp_path / "data", "fw_rel", fields, CHOICE_DOCS[:2])
    yaml_path = tmp_path / "data" / "fw_rel.yaml"
    monkeypatch.chdir(tmp_path)
    assert len(read_lm_eval_task(yaml_path).examples) == 2
    theirs = TaskManager(include_path=str(tmp_path / "data"), include_defaults=False).load(["fw_rel"])["tasks"]
    assert len(list(theirs["fw_rel"].eval_docs)) == 2
    monkeypatch.chdir(tmp_path / "data")  # from the YAML's own folder the path means data/data/...
    with pytest.raises(FlopwiseError, match="taken from the current directory"):
        read_lm_eval_task(yaml_path)


def test_reader_options_include_delimiter_and_json_list(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "_template.yaml").write_text(yaml.safe_dump({
        "dataset_path": "json", "output_type": "multiple_choice", "test_split": "validation",
        "doc_to_text": "Q: {{q}}\nA:", "doc_to_choice": ["yes", "no"], "doc_to_target": "{{gold}}"}))
    (folder / "data.json").write_text(json.dumps([{"q": "Is a list mutable?", "gold": 0},
                                                  {"q": "Is a tuple mutable?", "gold": 1}]))
    (folder / "yes_no.yaml").write_text(yaml.safe_dump({
        "include": "_template.yaml", "task": "yes_no", "target_delimiter": "",
        "dataset_kwargs": {"data_files": {"validation": str(folder / "data.json")}}}))
    [task] = read_lm_eval_folder(folder)
    assert task.name == "yes_no" and task.kind == "choice"
    assert [(e.context, e.choices, e.answer) for e in task.examples] == [
        ("Q: Is a list mutable?\nA:", ("yes", "no"), 0), ("Q: Is a tuple mutable?\nA:", ("yes", "no"), 1)]


BASE_FIELDS = {"task": "t", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
               "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label"}


@pytest.mark.parametrize("change,extra,field", [
    ({}, "process_docs: !function utils.process_docs\n", "process_docs"),
    ({"filter_list": [{"name": "strip", "filter": [{"function": "strip_whitespace"}]}]}, "", "filter_list"),
    ({"num_fewshot": 5}, "", "num_fewshot"),
    ({"dataset_path": "hellaswag"}, "", "dataset_path"),
    ({"description": "Answer the question."}, "", "description"),
    ({"output_type": "loglikelihood"}, "", "output_type"),
    ({"output_type": "generate_until", "doc_to_choice": None, "generation_kwargs": {"do_sample": True}}, "",
     "generation_kwargs"),
    ({"metric_list": [{"metric": "acc_mutual_info"}]}, "", "metric_list"),
    ({"dataset_kwargs": {"data_files": {"test": "*.jsonl"}}}, "", "dataset_kwargs.data_files"),
])
def test_what_would_change_the_scores_is_refused_in_one_line(tmp_path, change, extra, field):
    fields = {"dataset_kwargs": {"data_files": {"test": str(tmp_path / "t.jsonl")}}, **BASE_FIELDS, **change}
    path = write_task(tmp_path, "t", {k: v for k, v in fields.items() if v is not None}, CHOICE_DOCS[:2], extra)
    with pytest.raises(FlopwiseError) as caught:
        read_lm_eval_task(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and f"field '{field}'" in message
    assert "python -m flopwise.lm_eval --model flopwise" in message


@pytest.mark.parametrize("records,expected", [
    ([CHOICE_DOCS[0], {"choices": ["a", "b"], "label": 0}], "line 2: doc_to_text of task file"),
    ([{**CHOICE_DOCS[0], "label": 3}], "line 1: doc_to_target of task file .* gives 3, which is neither"),
    ([{**CHOICE_DOCS[0], "label": "LAMBDA"}], "gives 'LAMBDA', which is neither a choice"),
    ([{**CHOICE_DOCS[0], "choices": ["only"]}], "a list of two or more strings"),
    ([], "has no examples"),
])
def test_bad_records_are_named_in_one_line(tmp_path, records, expected):
    fields = {"dataset_kwargs": {"data_files": {"test": str(tmp_path / "t.jsonl")}}, **BASE_FIELDS}
    path = write_task(tmp_path, "t", fields, records)
    with pytest.raises(FlopwiseError, match=expected) as caught:
        read_lm_eval_task(path)
    assert "\n" not in str(caught.value)


def test_a_record_that_is_not_json_is_named(tmp_path):
    fields = {"dataset_kwargs": {"data_files": {"test": str(tmp_path / "t.jsonl")}}, **BASE_FIELDS}
    path = write_task(tmp_path, "t", fields, CHOICE_DOCS[:1])
    with open(tmp_path / "t.jsonl", "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    with pytest.raises(FlopwiseError, match=r"t.jsonl' line 2 is not JSON"):
        read_lm_eval_task(path)


# ---------------------------------------------------------------- registration and the command line


def test_entry_point_names_the_adapter():
    [point] = [p for p in entry_points(group="lm_eval.models") if p.name == "flopwise"]
    assert point.load() is FlopwiseLM
    from lm_eval.api.registry import get_model

    assert get_model("flopwise") is FlopwiseLM and get_model("hf").__name__ == "HFLM"  # lm-eval's own still there


def test_without_lm_eval_the_adapter_says_how_to_install_it(monkeypatch, capsys):
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "flopwise.evaluate.lm_eval_model")
    with pytest.raises(FlopwiseError, match=r"pip install 'flopwise\[eval\]'") as caught:
        importlib.import_module("flopwise.evaluate.lm_eval_model")
    assert "\n" not in str(caught.value)
    from flopwise.lm_eval import main as lm_eval_main

    monkeypatch.setattr(sys, "argv", ["flopwise.lm_eval"])
    assert lm_eval_main(["--model", "flopwise", "--tasks", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flopwise: error: ") and "flopwise[eval]" in err[0]


@pytest.mark.slow
def test_python_m_flopwise_lm_eval_runs_a_local_task_offline(run, task_folder, through_adapter, datasets_cache,
                                                             tmp_path):
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(datasets_cache)}
    command = [sys.executable, "-m", "flopwise.lm_eval", "--model", "flopwise", "--model_args",
               f"run={run},device=cpu", "--tasks", "fw_choice", "--include_path", str(task_folder),
               "--batch_size", "8", "--output_path", str(tmp_path / "out")]  # device as a model argument: it wins
    # over the cuda:0 lm-eval passes every model when --device is not given
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [written] = (tmp_path / "out").rglob("results_*.json")
    accuracy = json.loads(written.read_text())["results"]["fw_choice"]["acc,none"]
    assert accuracy == pytest.approx(through_adapter["results"]["fw_choice"]["acc,none"])
