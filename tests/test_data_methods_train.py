"""Data-side methods in real (tiny) training runs through the CLI: mixtures, online domain weights,
sample reweighting, curricula, SALT and ingest hygiene train, log what they did and resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flopwise.config import load_config
from flopwise.rundir import read_metrics
from tests.helpers import TINY, losses, train, train_events


def mixed(text_folder: Path, code_folder: Path, prose: float = 0.7, code: float = 0.3) -> list[str]:
    return ["--data", f"prose={text_folder}:{prose}", "--data", f"code={code_folder}:{code}"]


def final_eval(run: Path) -> dict:
    return [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "eval"][-1]


@pytest.mark.slow
def test_reweighted_mixed_run_resumes_exactly(tmp_path, text_folder, code_folder):
    """The acceptance test: mixture weights, online domain reweighting, per-sequence reweighting and a
    curriculum together, interrupted in the middle, continue exactly as the uninterrupted run."""
    args = [*TINY, *mixed(text_folder, code_folder), "--online-mixture", "loss", "--reweight",
            "--curriculum", "rarity", "--set", "methods.reweight.burn_in=0.1", "--budget", "30steps"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(*args, "--out", str(full)) == 0
    assert train(*args, "--stop-after", "14steps", "--out", str(part)) == 0
    assert train("--resume", str(part)) == 0
    assert losses(part) == losses(full)  # bit for bit
    assert [e["mixture"] for e in train_events(part)] == [e["mixture"] for e in train_events(full)]
    assert final_eval(part)["epochs"] == final_eval(full)["epochs"]
    mixtures = [e["mixture"] for e in train_events(full)]
    assert mixtures[0] != mixtures[-1]  # the weights moved during the run
    assert all(sum(m.values()) == pytest.approx(1.0) for m in mixtures)


@pytest.mark.slow
def test_static_mixture_is_sampled_to_its_weights_and_epochs_are_reported(tmp_path, text_folder, code_folder):
    run = tmp_path / "run"
    assert train(*TINY, *mixed(text_folder, code_folder, prose=0.25, code=0.75), "--budget", "40steps",
                 "--out", str(run)) == 0
    final = final_eval(run)
    assert set(final["domains"]) == {"code", "prose"}
    plan = json.loads((run / "plan.json").read_text())
    train_tokens = plan["corpus"]["domain_tokens"]["train"]
    tokens = 40 * 4 * 64  # steps x batch x seq_len
    for domain, share in (("code", 0.75), ("prose", 0.25)):
        assert final["epochs"][domain] == pytest.approx(share * tokens / train_tokens[domain], rel=0.02)
    assert train_events(run)[-1]["mixture"] == pytest.approx({"code": 0.75, "prose": 0.25})
    assert plan["data"]["hygiene"]["documents_in"] == 70  # 40 texts + 30 modules, nothing removed
    assert plan["data"]["hygiene"]["documents_out"] == 70


@pytest.mark.slow
def test_online_excess_uses_the_reference_runs_domain_losses(tmp_path, text_folder, code_folder):
    reference, run = tmp_path / "reference", tmp_path / "excess"
    data = [*TINY, *mixed(text_folder, code_folder, 0.5, 0.5), "--budget", "20steps"]
    assert train(*data, "--out", str(reference)) == 0
    assert train(*data, "--online-mixture", "excess", "--reference", str(reference), "--out", str(run)) == 0
    weights = [e["mixture"] for e in train_events(run)]
    assert weights[0] != weights[-1]
    # early in the run both domains are far above the reference: the one furthest above gains weight
    assert max(weights[1].values()) > 0.5


def test_online_excess_without_reference_fails_in_one_line(tmp_path, text_folder, capsys):
    assert train(*TINY, "--data", str(text_folder), "--budget", "4steps", "--online-mixture", "excess",
                 "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err.strip()
    assert "methods.online_mixture.rule='excess' needs methods.online_mixture.reference" in err and "\n" not in err


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, text_folder, code_folder) -> Path:
    """A small finished run on the same data and tokenizer (byte), as a SALT teacher."""
    run = tmp_path_factory.mktemp("teacher") / "teacher"
    assert train(*TINY, *mixed(text_folder, code_folder), "--budget", "30steps", "--out", str(run)) == 0
    return run


@pytest.mark.slow
def test_salt_distills_selects_and_resumes_exactly(tmp_path, text_folder, code_folder, teacher_run):
    args = [*TINY, *mixed(text_folder, code_folder), "--teacher", str(teacher_run), "--set", "methods.salt.kd_until=0.5",
            "--set", "methods.salt.select_pool=2", "--budget", "24steps"]
    full, part, plain = tmp_path / "full", tmp_path / "part", tmp_path / "plain"
    assert train(*args, "--out", str(full)) == 0
    assert train(*args, "--stop-after", "7steps", "--out", str(part)) == 0
    assert train("--resume", str(part)) == 0
    assert losses(part) == losses(full)
    assert train(*TINY, *mixed(text_folder, code_folder), "--budget", "24steps", "--out", str(plain)) == 0
    assert losses(full)[0] != losses(plain)[0]  # the teacher chose the first batch
    # rejected candidates are read but not counted as seen: 24 steps x 4 windows of 64 tokens were trained on
    train_tokens = json.loads((full / "plan.json").read_text())["corpus"]["domain_tokens"]["train"]
    epochs = final_eval(full)["epochs"]
    assert sum(epochs[d] * train_tokens[d] for d in epochs) == pytest.approx(24 * 4 * 64)
    # the teacher's forwards (over the pool of 2 x 4 windows, while p < 0.5) count against a FLOP budget
    teacher = train_events(full)[-1]["flops"] - train_events(plain)[-1]["flops"]
    per_step = json.loads((teacher_run / "plan.json").read_text())["flops_per_token"] / 3 * 8 * 64
    assert teacher == pytest.approx(11 * per_step, rel=0.02)  # steps 1-11 have p = step / 24 < 0.5


def test_salt_teacher_with_another_tokenizer_is_refused(tmp_path, text_folder, teacher_run, capsys):
    assert train("--data", str(text_folder), "--budget", "4steps", "--set", "model.size=tiny", "--teacher",
                 str(teacher_run), "--out", str(tmp_path / "x")) == 2  # BPE student, byte teacher
    err = capsys.readouterr().err.strip()
    assert err.startswith("flopwise: error: methods.salt.teacher=") and "tokenizer" in err and "\n" not in err


@pytest.mark.slow
def test_teacher_curriculum_scores_once_and_reuses_the_cache(tmp_path, text_folder, code_folder, teacher_run,
                                                             isolated_cache):
    args = [*TINY, *mixed(text_folder, code_folder), "--curriculum", "teacher", "--set",
            f"methods.curriculum.scorer={teacher_run}", "--budget", "12steps"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert train(*args, "--out", str(first)) == 0
    cached = sorted(isolated_cache.rglob("difficulty-*.npy"))
    assert cached
    stamps = [path.stat().st_mtime_ns for path in cached]
    assert train(*args, "--out", str(second)) == 0
    assert [path.stat().st_mtime_ns for path in cached] == stamps
    assert losses(first) == losses(second)


def test_ingest_removes_duplicates_and_reports_them(tmp_path, text_folder):
    data = tmp_path / "data"
    data.mkdir()
    texts = sorted(text_folder.glob("*.txt"))
    for path in texts:
        (data / path.name).write_text(path.read_text())
    (data / "copy.txt").write_text(texts[0].read_text())  # exact duplicate
    words = texts[1].read_text().split(" ")
    words[5] = "changed"
    (data / "near.txt").write_text(" ".join(words))  # one word changed
    exact, near = tmp_path / "exact", tmp_path / "near"
    assert train(*TINY, "--data", str(data), "--budget", "2steps", "--out", str(exact)) == 0
    assert train(*TINY, "--data", str(data), "--budget", "2steps", "--dedup", "near", "--out", str(near)) == 0
    report = json.loads((exact / "plan.json").read_text())["data"]["hygiene"]
    assert (report["documents_in"], report["exact_duplicates"], report["near_duplicates"]) == (42, 1, 0)
    report = json.loads((near / "plan.json").read_text())["data"]["hygiene"]
    assert (report["exact_duplicates"], report["near_duplicates"], report["documents_out"]) == (1, 1, 40)


@pytest.mark.slow
def test_plan_replay_suggests_a_share_from_pilot_runs(tmp_path, text_folder, code_folder, teacher_run):
    from flopwise.cli import main
    from flopwise.replay.law import PAPER_EPSILON, ReplayLaw

    loop = ["--set", "model.seq_len=64", "--set", "optim.batch_size=4", "--set", "train.eval_tokens=2048"]
    out = tmp_path / "replay.json"
    assert main(["plan", "--budget", "20ktokens", "--init-from", str(teacher_run / "final"), "--replay", "new",
                 "--data", f"new={code_folder}", "--data", f"general={text_folder}", "--pilot-tokens", "6144",
                 "--pilots", str(tmp_path / "pilots"), "--out", str(out), *loop]) == 0
    suggestion = json.loads(out.read_text())
    assert [(p["ratio"], p["tokens"]) for p in suggestion["points"]] == [
        (r, t) for r in (0.25, 0.5, 0.75, 1.0) for t in (2048.0, 6144.0)]
    law = ReplayLaw.from_dict(suggestion["law"])
    base = suggestion["base_general_loss"]
    for found in (suggestion["at_pilots"], suggestion["at_run"]):
        ratio, tokens = found["critical_ratio"], found["tokens"]
        assert 0 < ratio <= 1
        assert law.general_loss(ratio, tokens) <= base + PAPER_EPSILON + 1e-9
        if ratio < 1:
            assert law.general_loss(min(1.0, ratio * 1.05), tokens) > base + PAPER_EPSILON
        assert found["weights"] == pytest.approx({"new": ratio, "general": 1 - ratio})
    assert suggestion["at_run"]["tokens"] == 20_000 and suggestion["at_pilots"]["tokens"] == 6144
    # the pilots trained on the mixture they were asked for
    share = load_config(tmp_path / "pilots" / "share-0.25" / "config.toml")
    assert share.budget.tokens == 6144  # extended from 2048 tokens
    assert share.methods.mixture.weights == pytest.approx({"new": 0.25, "general": 0.75})


def test_plan_replay_needs_a_token_budget(tmp_path, text_folder, teacher_run, capsys):
    from flopwise.cli import main

    assert main(["plan", "--budget", "1m", "--init-from", str(teacher_run / "final"), "--replay", "new",
                 "--data", f"new={text_folder}"]) == 2
    assert "--replay needs the continued run's budget in tokens" in capsys.readouterr().err


def test_data_command_summarizes_domains_duplicates_and_tokens(tmp_path, text_folder, code_folder, capsys):
    from flopwise.cli import main

    out = tmp_path / "summary.json"
    assert main(["data", *mixed(text_folder, code_folder), "--tokenizer", "byte", "--set", "data.min_chars=500",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prose" in printed and "code" in printed and "min_chars removed 2" in printed
    summary = json.loads(out.read_text())
    # __hello__.py (226 characters) and antigravity.py (498) are the only texts under 500 characters
    assert summary["hygiene"]["filtered"] == {"min_chars": 2}
    assert summary["domain_tokens"]["train"]["code"] > 0 and summary["domain_tokens"]["val"]["prose"] > 0
