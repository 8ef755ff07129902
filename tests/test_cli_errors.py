"""Bad input: one clear line naming the input and the fix, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest

from flopwise.cli import join_negative_values, main
from tests.helpers import TINY, run_error


@pytest.mark.parametrize("extra, expected", [
    (["--budget", "10tokens"], "budget.tokens=10 is smaller than one step"),
    (["--budget", "3x"], "unknown unit 'x'"),
    (["--set", "model.d_modle=64"], "unknown key 'model.d_modle'"),
    (["--set", "model.d_model=100", "--set", "model.n_heads=3"], "n_heads=3 does not divide model.d_model=100"),
    (["--set", "optim.batch_size=0"], "optim.batch_size=0"),
])
def test_bad_training_input(tmp_path, capsys, text_folder, extra, expected):
    out = tmp_path / "run"
    args = ["train", "--data", str(text_folder), "--out", str(out), *TINY]
    if "--budget" not in extra:
        args += ["--budget", "5steps"]
    err = run_error(capsys, args + extra)
    assert expected in err
    assert not out.exists()


def test_missing_and_empty_data(tmp_path, capsys):
    out = tmp_path / "run"
    err = run_error(capsys, ["train", "--data", str(tmp_path / "nope"), "--budget", "5steps", "--out", str(out), *TINY])
    assert "nope" in err and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = run_error(capsys, ["train", "--data", str(empty), "--budget", "5steps", "--out", str(out), *TINY])
    assert "empty" in err
    assert not out.exists()


def test_no_budget(tmp_path, capsys, text_folder):
    err = run_error(capsys, ["train", "--data", str(text_folder), "--out", str(tmp_path / "r"), *TINY])
    assert "--budget" in err


def test_resume_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    err = run_error(capsys, ["train", "--resume", str(tmp_path / "junk")])
    assert "is not a flopwise run folder" in err
    err = run_error(capsys, ["eval", str(tmp_path / "junk")])
    assert "is not a flopwise run folder" in err


def test_resume_rejects_config_changes(tmp_path, capsys):
    err = run_error(capsys, ["train", "--resume", str(tmp_path), "--data", "x", "--set", "optim.lr=1"])
    assert "--data, --set cannot change when resuming" in err


def test_out_folder_holding_a_run_is_not_overwritten(tmp_path, capsys, text_folder):
    out = tmp_path / "run"
    assert main(["train", "--data", str(text_folder), "--budget", "3steps", "--out", str(out), *TINY]) == 0
    before = (out / "metrics.jsonl").read_text()
    err = run_error(capsys, ["train", "--data", str(text_folder), "--budget", "3steps", "--out", str(out), *TINY])
    assert "already holds a run" in err
    assert (out / "metrics.jsonl").read_text() == before


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, capsys, text_folder):
    data = tmp_path / "data"
    data.mkdir()
    for path in sorted(text_folder.iterdir())[:10]:
        (data / path.name).write_bytes(path.read_bytes())
    (data / "latin1.txt").write_bytes("café au lait ".encode("latin-1") * 50)
    expected = ("café au lait ".encode("latin-1") * 50).decode("utf-8", errors="replace").count("\ufffd")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--budget", "2steps", "--out", str(out), *TINY]) == 0
    assert f"{expected} undecodable bytes replaced" in capsys.readouterr().out
    assert json.loads((out / "plan.json").read_text())["read"]["replaced_bytes"] == expected


def test_negative_values_join_their_flag_but_not_flags_or_positionals():
    argv = ["sample", "r", "--temperature", "-1e3", "--top-k", "-2", "--checkpoint", "--prompt", "-x", "--", "-5"]
    assert join_negative_values(argv) == ["sample", "r", "--temperature=-1e3", "--top-k=-2", "--checkpoint",
                                          "--prompt", "-x", "--", "-5"]
    assert join_negative_values(["memory", "--memory", "-1GiB", "--batch=-2", "--batch", "-.5"]) == [
        "memory", "--memory=-1GiB", "--batch=-2", "--batch=-.5"]
