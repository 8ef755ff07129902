"""The bad-input matrix: every command, driven end to end through ``flopwise.cli.main``, given input a user
could plausibly mistype.  Each case must give one clear line naming the file, field or value (exit code 2),
no traceback, and leave nothing behind: no new, changed or removed file under the test's folder or the
shared runs and text, and no --out / --to folder that was not there before.

A case is ``argv`` (with placeholders: {tmp} the test's folder, which is also the working directory, so
that a default output such as runs/<date-time> or ./report would show up there; {text} a valid text
folder; {run} a finished tiny run; {unfinished} the same run without final/), the fragment the error line
must contain, and the files ``setup`` writes before the command runs.  Cases marked ``usage`` are
argparse's own errors: they raise SystemExit(2) and print the usage lines before their one error line.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from flopwise.cli import main
from tests.helpers import TINY

# a valid tiny training command line; a case appends the one thing it gets wrong
TRAIN = ["train", "--data", "{text}", "--out", "{tmp}/run", *TINY]
TRAIN_3 = [*TRAIN, "--budget", "3steps"]
BARE = ["train", "--data", "{text}", "--out", "{tmp}/run", "--tokenizer", "byte"]  # flags TINY's --set would override


# files the cases' argv refer to, created in {tmp} before the snapshot
def writes(name: str, text: str) -> Callable[[Path], None]:
    """A setup that writes one file of ``text`` into the test's folder."""

    def setup(tmp: Path) -> None:
        (tmp / name).write_text(text)
    return setup


_file = writes("afile.txt", "some text, not a folder\n")
def _empty(tmp: Path) -> None:
    (tmp / "empty").mkdir()


def _self_loop(tmp: Path) -> None:
    os.symlink("loop", tmp / "loop")  # a link to itself: stat() fails with ELOOP


def _dangling(tmp: Path) -> None:
    (tmp / "dangling").mkdir()
    os.symlink(tmp / "nowhere.txt", tmp / "dangling" / "a.txt")


def _loop_inside(tmp: Path) -> None:
    (tmp / "loopy").mkdir()
    os.symlink("a", tmp / "loopy" / "b")
    os.symlink("b", tmp / "loopy" / "a")


_fake_parquet = writes("data.parquet", "plain text, not a parquet file\n" * 20)
_bad_toml = writes("bad.toml", "[model\nd_model = 64\n")
_wrong_suffix = writes("run.txt", "[model]\nd_model = 64\n")
_unknown_section = writes("sections.toml", "[modle]\nd_model = 64\n")
_unknown_key_in_file = writes("keys.toml", "[optim]\nlearning_rate = 0.01\n")
_yaml_list = writes("list.yaml", "- model.d_model=64\n- optim.lr=0.01\n")
_bad_jsonl = writes("docs.jsonl", '{"text": "one document"}\n{"text": "cut short\n')
def _nonempty(tmp: Path) -> None:
    (tmp / "taken").mkdir()
    (tmp / "taken" / "keep.txt").write_text("keep me\n")


def _existing_out_dir(tmp: Path) -> None:
    (tmp / "existing").mkdir()


_yaml_scalar = writes("scalar.yaml", "just a string\n")
_fake_tokenizer = writes("tokenizer.json", "not json at all")
def case(argv: list[str], fragment: str, setup=None, *, id: str, usage: bool = False):
    """argv, the fragment the one error line must contain, the files to write first, and whether it is an
    argparse usage error."""
    return pytest.param(argv, fragment, setup, usage, id=id)


CASES = [
    # --- train: budgets
    case([*TRAIN, "--budget", "abc"], "'abc'", None, id="train-budget-unparseable"),
    case([*TRAIN, "--budget", "0steps"], "budget.steps", None, id="train-budget-zero"),
    case([*TRAIN, "--budget=-5steps"], "-5steps", None, id="train-budget-negative"),
    # without '=' argparse alone would take -5steps for a flag (and only say --budget expected one argument)
    case([*TRAIN, "--budget", "-5steps"], "budget '-5steps' (budget.steps=-5) must be a positive number", None,
         id="train-budget-negative-without-equals"),
    case([*TRAIN, "--budget", "3stesp"], "'stesp'", None, id="train-budget-unit-typo"),
    case([*TRAIN, "--budget", ","], "--budget", None, id="train-budget-empty-list"),
    case([*TRAIN, "--budget", "1e999s"], "budget.seconds", None, id="train-budget-infinite"),
    case(TRAIN, "--budget", None, id="train-budget-missing"),
    case([*TRAIN, "--budget", "10tokens"], "budget.tokens", None, id="train-budget-below-one-step"),
    case([*TRAIN_3, "--stop-after", "2stesp"], "'stesp'", None, id="train-stop-after-typo"),
    case([*TRAIN_3, "--stop-after", "0steps"], "budget.steps", None, id="train-stop-after-zero"),
    # --- train: --set
    case([*TRAIN_3, "--set", "model.d_modle=64"], "model.d_modle", None, id="train-set-unknown-key"),
    case([*TRAIN_3, "--set", "modle.d_model=64"], "modle", None, id="train-set-unknown-section"),
    case([*TRAIN_3, "--set", "model.d_model=abc"], "model.d_model", None, id="train-set-bad-type"),
    case([*TRAIN_3, "--set", "model.d_model"], "model.d_model", None, id="train-set-no-equals"),
    case([*TRAIN_3, "--set", "model=64"], "model", None, id="train-set-section-as-value"),
    case([*TRAIN_3, "--set", "model.size.big=1"], "model.size", None, id="train-set-value-as-section"),
    case([*TRAIN_3, "--set", "optim.lr=-1"], "optim.lr", None, id="train-set-negative-lr"),
    case([*TRAIN_3, "--set", "optim.name=adamx"], "adamx", None, id="train-set-unknown-optimizer"),
    case([*TRAIN_3, "--set", "schedule.name=cosin"], "cosin", None, id="train-set-unknown-schedule"),
    case([*TRAIN_3, "--set", "optim.batch_size=0"], "optim.batch_size", None, id="train-set-zero-batch"),
    case([*TRAIN_3, "--set", "train.checkpoint_every=2"], "train.checkpoint_every", None,
         id="train-set-share-above-one"),
    case([*TRAIN_3, "--set", "model.n_heads=5"], "n_heads=5", None, id="train-heads-not-dividing"),
    case([*TRAIN_3, "--set", "model.n_kv_heads=3"], "n_kv_heads=3", None, id="train-kv-heads-not-dividing"),
    case([*TRAIN_3, "--set", 'methods.use=["nope"]'], "nope", None, id="train-set-unknown-method"),
    case([*TRAIN_3, "--method", "lora", "--set", "methods.lora.rank=-1"], "methods.lora.rank", None,
         id="train-set-bad-method-option"),
    # --- train: --config
    case([*TRAIN_3, "--config", "{tmp}/missing.toml"], "missing.toml", None, id="train-config-missing"),
    case([*TRAIN_3, "--config", "{tmp}/bad.toml"], "bad.toml", _bad_toml, id="train-config-not-toml"),
    case([*TRAIN_3, "--config", "{tmp}/run.txt"], "run.txt", _wrong_suffix, id="train-config-wrong-suffix"),
    case([*TRAIN_3, "--config", "{tmp}/sections.toml"], "modle", _unknown_section,
         id="train-config-unknown-section"),
    case([*TRAIN_3, "--config", "{tmp}/keys.toml"], "optim.learning_rate", _unknown_key_in_file,
         id="train-config-unknown-key"),
    case([*TRAIN_3, "--config", "{tmp}/list.yaml"], "list.yaml", _yaml_list, id="train-config-yaml-list"),
    case([*TRAIN_3, "--config", "{tmp}/scalar.yaml"], "scalar.yaml", _yaml_scalar,
         id="train-config-yaml-scalar"),
    case([*TRAIN_3, "--config", "{tmp}"], "{tmp}", None, id="train-config-is-a-folder"),
    # --- train: data
    case([*TRAIN_3, "--data", "{tmp}/nowhere"], "nowhere", None, id="train-data-missing"),
    case([*TRAIN_3, "--data", "{tmp}/empty"], "empty", _empty, id="train-data-empty-folder"),
    case([*TRAIN_3, "--data", "{tmp}/loop"], "loop", _self_loop, id="train-data-link-loop"),
    case([*TRAIN_3, "--data", "{tmp}/dangling"], "dangling", _dangling, id="train-data-dangling-link"),
    case([*TRAIN_3, "--data", "{tmp}/loopy"], "loopy", _loop_inside, id="train-data-loop-inside-folder"),
    case([*TRAIN_3, "--data", "{tmp}/data.parquet"], "data.parquet", _fake_parquet,
         id="train-data-text-named-parquet"),
    case([*TRAIN_3, "--data", "{tmp}/docs.jsonl"], "docs.jsonl", _bad_jsonl, id="train-data-bad-jsonl"),
    case([*TRAIN_3, "--data", "{text}:0.5"], ":0.5", None, id="train-data-weight-without-name"),
    case([*TRAIN_3, "--val-data", "held={text}:0.5"], "--val-data", None, id="train-val-data-weight"),
    case([*TRAIN_3, "--include", "*.nomatch"], "data.include", None, id="train-include-matches-nothing"),
    case([*TRAIN_3, "--tokenizer", "{tmp}/none.json"], "none.json", None, id="train-tokenizer-missing"),
    case([*TRAIN_3, "--tokenizer", "{tmp}/tokenizer.json"], "tokenizer.json", _fake_tokenizer,
         id="train-tokenizer-not-json"),
    # --- train: model, recipe, methods, device
    case([*BARE, "--budget", "3steps", "--model", "huge"], "huge", None, id="train-model-unknown-size"),
    case([*TRAIN_3, "--recipe", "fancy"], "fancy", None, id="train-recipe-unknown"),
    case([*TRAIN_3, "--method", "galor"], "galor", None, id="train-method-unknown"),
    case([*TRAIN_3, "--method", "lora", "--method", "galore"], "galore", None, id="train-methods-conflict"),
    case([*TRAIN_3, "--device", "tpu"], "tpu", None, id="train-device-unknown"),
    case([*TRAIN_3, "--memory", "8XB"], "8XB", None, id="train-memory-bad-size"),
    case([*TRAIN_3, "--target-loss", "-1"], "train.target_loss", None, id="train-target-loss-negative"),
    case([*TRAIN_3, "--online-mixture", "excess"], "methods.online_mixture.reference", None,
         id="train-excess-without-reference"),
    case([*TRAIN_3, "--teacher", "{tmp}/empty"], "empty", _empty, id="train-teacher-not-a-run"),
    case([*BARE[:5], "--budget", "3steps", "--init-from", "{tmp}/nowhere"], "nowhere", None,
         id="train-init-from-missing"),
    case([*TRAIN_3, "--init-from", "{tmp}/nowhere"], "model.size", None, id="train-init-from-with-model-size"),
    case([*TRAIN_3, "--auto", "--set", "model.d_model=64"], "model.d_model", None,
         id="train-auto-with-fixed-shape"),
    case([*TRAIN_3, "--seed", "abc"], "--seed", None, usage=True, id="train-seed-not-int"),
    case([*TRAIN_3, "--dedup", "fuzzy"], "fuzzy", None, usage=True, id="train-dedup-choice"),
    case([*TRAIN_3, "--budgte", "3steps"], "--budgte", None, usage=True,
         id="train-flag-typo"),
    # --- train: --out and --resume
    case([*TRAIN_3[:3], *TRAIN_3[5:], "--out", "{tmp}/afile.txt"], "afile.txt", _file,
         id="train-out-is-a-file"),
    case([*TRAIN_3[:3], *TRAIN_3[5:], "--out", "{tmp}/afile.txt/run"], "afile.txt", _file,
         id="train-out-under-a-file"),
    case([*TRAIN_3[:3], *TRAIN_3[5:], "--out", "{run}"], "already holds a run", None,
         id="train-out-holds-a-run"),
    # the run folder's missing parents are created with it: they must go again with it
    case(["train", "--data", "{tmp}/empty", *TRAIN_3[5:], "--out", "{tmp}/new/sub/run"], "empty", _empty,
         id="train-out-new-parents-removed"),
    case(["train", "--resume", "{tmp}/empty"], "empty", _empty, id="resume-not-a-run"),
    case(["train", "--resume", "{tmp}/afile.txt"], "'{tmp}/afile.txt' is not a flopwise run folder", _file,
         id="resume-a-file"),
    case(["train", "--resume", "{tmp}/nowhere"], "nowhere", None, id="resume-missing"),
    case(["train", "--resume", "{run}", "--out", "{tmp}/other"], "--out", None, id="resume-with-out"),
    case(["train", "--resume", "{run}", "--set", "optim.lr=0.1"], "--set", None, id="resume-with-set"),
    case(["train", "--resume", "{run}", "--auto"], "--auto", None, id="resume-with-auto"),
    case(["train", "--resume", "{run}"], "already spent its budget", None, id="resume-finished-no-budget"),
    case(["train", "--resume", "{run}", "--budget", "2steps"], "--budget", None,
         id="resume-smaller-budget"),
    case(["train", "--resume", "{run}", "--budget", "3stesp"], "'stesp'", None, id="resume-budget-typo"),
    # --- sft and dpo: the starting model ('runs/missing' reads as a hub id too: its folder 'runs' is here)
    case(["dpo", "--init-from", "empty/missing", "--budget", "2steps", "--out", "{tmp}/d"],
         "--init-from 'empty/missing': no such folder: check the path", _empty, id="dpo-init-from-missing-folder"),
    case(["sft", "--init-from", "{tmp}/afile.txt", "--budget", "2steps", "--out", "{tmp}/d"],
         "--init-from '{tmp}/afile.txt' is a file", _file, id="sft-init-from-a-file"),
    case(["dpo", "--init-from", "{tmp}/empty", "--budget", "2steps", "--out", "{tmp}/d"],
         "--init-from '{tmp}/empty' is neither a flopwise run folder (no config.toml) nor a Hugging Face model "
         "folder (no config.json)", _empty, id="dpo-init-from-not-a-model-folder"),
    # --- eval
    case(["eval", "{tmp}/empty"], "empty", _empty, id="eval-not-a-run"),
    case(["eval", "{tmp}/afile.txt"], "afile.txt", _file, id="eval-a-file"),
    case(["eval", "{unfinished}"], "no final model", None, id="eval-run-without-final"),
    case(["eval", "{run}", "--device", "tpu"], "tpu", None, id="eval-device-unknown"),
    case(["eval", "{run}", "--max-tokens", "-5"], "--max-tokens", None, id="eval-max-tokens-negative"),
    # --- sample
    case(["sample", "{tmp}/empty"], "empty", _empty, id="sample-not-a-run"),
    case(["sample", "{unfinished}"], "no final model", None, id="sample-run-without-final"),
    case(["sample", "{run}", "--temperature", "-1"], "--temperature", None, id="sample-temperature-negative"),
    case(["sample", "{run}", "--temperature", "nan"], "--temperature", None, id="sample-temperature-nan"),
    case(["sample", "{run}", "--top-p", "0"], "--top-p", None, id="sample-top-p-zero"),
    case(["sample", "{run}", "--top-p", "1.5"], "--top-p", None, id="sample-top-p-above-one"),
    case(["sample", "{run}", "--top-k", "-1"], "--top-k", None, id="sample-top-k-negative"),
    case(["sample", "{run}", "--max-tokens", "-1"], "--max-tokens", None, id="sample-max-tokens-negative"),
    case(["sample", "{run}", "--max-tokens", "0"], "--max-tokens 0 must be a positive", None,
         id="sample-max-tokens-zero"),
    case(["sample", "{run}", "--temperature", "-inf"], "--temperature -inf must be 0", None,
         id="sample-temperature-minus-inf"),
    case(["sample", "{run}", "--temperature", "-1e3"], "--temperature -1000.0 must be 0", None,
         id="sample-temperature-negative-exponent"),
    # a byte that is not UTF-8 on the command line reaches Python as a lone surrogate ($'caf\xe9')
    case(["sample", "{run}", "--prompt", "caf\udce9"], "--prompt is not UTF-8 text (byte 0xe9 at position 4)", None,
         id="sample-prompt-not-utf8"),
    case(["sample", "{run}", "--temperature", "hot"], "--temperature", None, usage=True,
         id="sample-temperature-not-a-number"),
    # --- export
    case(["export", "{tmp}/empty", "--to", "{tmp}/hf"], "'{tmp}/empty' is not a flopwise run folder", _empty,
         id="export-not-a-run"),
    case(["export", "{unfinished}", "--to", "{tmp}/hf"], "no final model", None,
         id="export-run-without-final"),
    case(["export", "{run}", "--to", "{tmp}/taken"], "taken", _nonempty, id="export-to-non-empty-folder"),
    case(["export", "{run}", "--to", "{tmp}/afile.txt"], "--to '{tmp}/afile.txt'", _file, id="export-to-a-file"),
    case(["export", "{run}", "--to", "{tmp}/afile.txt/hf"], "'{tmp}/afile.txt' is a file", _file,
         id="export-to-under-a-file"),
    case(["export", "{run}"], "--to", None, usage=True, id="export-without-to"),
    # --- report
    case(["report", "{tmp}/empty", "--out", "{tmp}/rep"], "empty", _empty, id="report-not-a-run"),
    case(["report", "{tmp}/afile.txt", "--out", "{tmp}/rep"], "afile.txt", _file, id="report-a-file"),
    case(["report", "{run}", "--out", "{tmp}/afile.txt"], "afile.txt", _file, id="report-out-is-a-file"),
    case(["report", "{run}", "{tmp}/nowhere"], "nowhere", None, id="report-second-run-missing"),
    # --- memory
    case(["memory", "--memory", "8XB"], "8XB", None, id="memory-bad-size"),
    case(["memory", "--memory", "0GiB"], "memory.limit", None, id="memory-zero-size"),
    case(["memory", "--memory=-1GiB"], "-1GiB", None, id="memory-negative-size"),
    case(["memory", "--memory", "-1GiB"], "memory.limit='-1GiB': must be positive", None,
         id="memory-negative-size-without-equals"),
    case(["memory", "--batch", "0"], "--batch", None, id="memory-batch-zero"),
    case(["memory", "--batch", "-2"], "--batch", None, id="memory-batch-negative"),
    case(["memory", "--model", "huge"], "huge", None, id="memory-model-unknown"),
    case(["memory", "--set", "model.d_model=100", "--set", "model.n_heads=3"], "n_heads=3", None,
         id="memory-heads-not-dividing"),
    case(["memory", "--config", "{tmp}/missing.toml"], "missing.toml", None, id="memory-config-missing"),
    # --- plan
    case(["plan", "--budget", "20mins2"], "20mins2", None, id="plan-budget-unparseable"),
    case(["plan", "--budget", "20m", "--init-from", "{tmp}/nowhere"], "--init-from", None,
         id="plan-init-from-without-replay"),
    case(["plan", "--budget", "20m", "--replay", "new", "--init-from", "{tmp}/nowhere"], "--budget", None,
         id="plan-replay-needs-tokens"),
    case(["plan", "--budget", "20m", "--set", "model.d_modle=64"], "model.d_modle", None,
         id="plan-set-unknown-key"),
    case(["plan", "--budget", "20m", "--out", "{tmp}/existing"], "existing", _existing_out_dir,
         id="plan-out-is-a-folder"),
    # --- scan
    case(["scan", "--budget", "5steps", "--out", "{tmp}/scan"], "5 steps", None,
         id="scan-budget-not-seconds"),
    case(["scan", "--budget", "1m", "--set", "model.init_from={tmp}/nowhere", "--out", "{tmp}/scan"],
         "--init-from", None, id="scan-init-from"),
    case(["scan", "--budget", "1m", "--init-from", "{tmp}/nowhere"], "--init-from", None, usage=True,
         id="scan-has-no-init-from-flag"),
    case(["scan", "--budget", "1m", "--extend", "{tmp}/empty", "--out", "{tmp}/scan"], "--out", _empty,
         id="scan-extend-with-out"),
    case(["scan", "--budget", "1m", "--extend", "{tmp}/empty"], "empty", _empty, id="scan-extend-not-a-scan"),
    case(["scan", "--budget", "1m", "--out", "{tmp}/afile.txt"], "afile.txt", _file, id="scan-out-is-a-file"),
    # --- fit
    case(["fit", "{tmp}/empty"], "empty", _empty, id="fit-not-a-run"),
    case(["fit", "{unfinished}"], "has not finished", None, id="fit-run-without-final"),
    case(["fit", "{run}", "--out", "{tmp}/law.json"], "1 model size", None, id="fit-one-run"),
    case(["fit", "{run}", "--bootstrap", "-1"], "--bootstrap", None, id="fit-bootstrap-negative"),
    # --- data
    case(["data", "--data", "{tmp}/nowhere"], "nowhere", None, id="data-missing"),
    case(["data", "--data", "{tmp}/data.parquet", "--tokenizer", "byte"], "data.parquet", _fake_parquet,
         id="data-text-named-parquet"),
    case(["data", "--data", "{text}", "--tokenizer", "byte", "--set", "data.min_chars=-3"], "data.min_chars", None,
         id="data-set-negative"),
    case(["data", "--data", "{text}", "--tokenizer", "byte", "--out", "{tmp}/afile.txt/summary.json"],
         "afile.txt", _file, id="data-out-under-a-file"),
    case(["data", "--data", "{text}", "--tokenizer", "byte", "--out", "{tmp}/existing"], "existing",
         _existing_out_dir, id="data-out-is-a-folder"),
    # --- bench (each fails before its first training step)
    case(["bench", "--seconds", "0", "--out", "{tmp}/speed.json"], "--seconds", None, id="bench-seconds-zero"),
    case(["bench", "--seconds", "-30", "--out", "{tmp}/speed.json"], "--seconds", None,
         id="bench-seconds-negative"),
    case(["bench", "--set", "model.d_modle=64", "--out", "{tmp}/speed.json"], "model.d_modle", None,
         id="bench-set-unknown-key"),
    case(["bench", "--corpus", "{tmp}/nowhere", "--out", "{tmp}/speed.json"], "nowhere", None,
         id="bench-corpus-missing"),
    case(["bench", "--out", "{tmp}/existing"], "existing", _existing_out_dir, id="bench-out-is-a-folder"),
    case(["bench", "--seeds"], "--seeds", None, usage=True, id="bench-seeds-empty"),
    # --- no command, unknown command
    case(["trian", "--budget", "3m"], "trian", None, usage=True, id="unknown-command"),
    case([], "COMMAND", None, usage=True, id="no-command"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_folder) -> Path:
    """A finished tiny run (run/) and the same run without its final model (unfinished/)."""
    root = tmp_path_factory.mktemp("bad-input-runs")
    assert main(["train", "--data", str(text_folder), "--budget", "3steps", "--out", str(root / "run"), *TINY]) == 0
    shutil.copytree(root / "run", root / "unfinished", ignore=shutil.ignore_patterns("final"))
    return root


def snapshot(*roots: Path) -> dict[str, str]:
    """Every entry under ``roots``: a folder, a link (and where it points) or a file (and its contents' hash)."""
    entries = {}
    for root in roots:
        for folder, dirnames, filenames in os.walk(root):  # links are not followed: loops are fine
            for name in dirnames + filenames:
                path = Path(folder) / name
                if path.is_symlink():
                    entries[str(path)] = f"link to {os.readlink(path)}"
                elif path.is_dir():
                    entries[str(path)] = "folder"
                else:
                    entries[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest()
    return entries


def _output_folders(argv: list[str]) -> list[Path]:
    return [Path(argv[i + 1]) for i, arg in enumerate(argv[:-1]) if arg in ("--out", "--to")]


@pytest.mark.parametrize("argv, fragment, setup, usage", CASES)
def test_bad_input(argv, fragment, setup, usage, tmp_path, monkeypatch, capsys, text_folder, runs):
    monkeypatch.chdir(tmp_path)  # default outputs (runs/..., ./report, scans/...) would land here
    places = {"{tmp}": str(tmp_path), "{text}": str(text_folder), "{run}": str(runs / "run"),
              "{unfinished}": str(runs / "unfinished")}

    def fill(text: str) -> str:
        for placeholder, value in places.items():
            text = text.replace(placeholder, value)
        return text

    argv, fragment = [fill(arg) for arg in argv], fill(fragment)
    if setup:
        setup(tmp_path)
    outputs = {path: path.exists() for path in _output_folders(argv)}
    before = snapshot(tmp_path, runs, text_folder)
    capsys.readouterr()

    if usage:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        code = exit_info.value.code
    else:
        code = main(argv)
    out, err = capsys.readouterr()

    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    if usage:
        # argparse's own usage error: 'usage: ...' (possibly over several lines), then one error line
        assert lines and lines[0].startswith("usage: "), err
        assert len([line for line in lines if ": error: " in line]) == 1, err
        line = lines[-1]
        assert line.startswith("flopwise") and ": error: " in line, err
    else:
        assert len(lines) == 1, err
        line = lines[0]
        assert line.startswith("flopwise: error: "), err
    assert code == 2, (code, err)
    assert fragment in line, line
    after = snapshot(tmp_path, runs, text_folder)
    assert after == before, {"new or changed": sorted(k for k in after if after[k] != before.get(k)),
                             "gone": sorted(k for k in before if k not in after)}
    for path, existed in outputs.items():
        assert path.exists() == existed, f"{path} was {'removed' if existed else 'left behind'}"


def _truncated_final_weights(run: Path) -> str:
    weights = run / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return (f"'{weights}' is damaged (incomplete metadata, file not fully covered): use --checkpoint for the run's "
            f"newest checkpoint, or delete {run / 'final'} and run flopwise train --resume {run} to train its last "
            "steps again and write it")


def _unparsable_plan(run: Path) -> str:
    (run / "plan.json").write_text('{"model": {"d_model": 64,', encoding="utf-8")
    return f"'{run / 'plan.json'}' is damaged (Expecting property name enclosed in double quotes: line 1 column 26"


def _undecodable_plan(run: Path) -> str:
    (run / "plan.json").write_bytes(b'{"model": "\xff"}')
    return f"'{run / 'plan.json'}' is damaged ('utf-8' codec can't decode byte 0xff in position 11"


def _plan_without_model(run: Path) -> str:
    (run / "plan.json").write_text('{"flops_per_token": 1}', encoding="utf-8")
    return (f"'{run / 'plan.json'}' is damaged (no 'model' key): it holds the model shape the run's checkpoints were "
            "saved with, so restore it from a copy of the run folder, or start a new run")


@pytest.mark.parametrize("source, damage, argv", [
    ("run", _truncated_final_weights, ["eval", "{run}"]),
    ("run", _truncated_final_weights, ["sample", "{run}", "--max-tokens", "4"]),
    ("run", _truncated_final_weights, ["chat", "{run}", "--prompt", "hello"]),
    ("unfinished", _unparsable_plan, ["train", "--resume", "{run}"]),
    ("unfinished", _undecodable_plan, ["train", "--resume", "{run}"]),
    ("unfinished", _plan_without_model, ["eval", "{run}", "--checkpoint"]),
], ids=["final-eval", "final-sample", "final-chat", "plan-json", "plan-utf8", "plan-no-model"])
def test_a_damaged_run_file_is_one_line_naming_it_and_the_fix(source, damage, argv, runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / source, run)
    expected = damage(run)
    before = snapshot(run)
    capsys.readouterr()
    assert main([arg.replace("{run}", str(run)) for arg in argv]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"flopwise: error: {expected}"), err
    assert snapshot(run) == before  # a refused command changes nothing in the run
