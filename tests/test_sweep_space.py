"""The sweep's search space is read strictly (every key and range checked as the config checks it, one line
each) and drawn by Optuna as declared; the total budget never starts a trial it cannot finish."""

from __future__ import annotations

from pathlib import Path

import pytest

from flopwise.errors import FlopwiseError
from flopwise.sweep.space import read_space
from flopwise.sweep.total import TotalBudget

optuna = pytest.importorskip("optuna")

SPACE = """
[optim.lr]
low = 1e-4
high = 3e-2
log = true

[model.d_model]
low = 64
high = 256
step = 32

["optim.batch_size"]
choices = [8, 16, 32]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_nested_and_quoted_tables_become_dotted_keys_with_their_kinds(tmp_path):
    space = read_space(write(tmp_path, SPACE))
    kinds = {p.key: type(p.distribution()).__name__ for p in space.parameters}
    assert kinds == {"optim.lr": "FloatDistribution", "model.d_model": "IntDistribution",
                     "optim.batch_size": "CategoricalDistribution"}


def test_seeded_tpe_draws_inside_the_space_and_repeats_with_the_seed(tmp_path):
    space = read_space(write(tmp_path, SPACE))

    def draws(seed: int) -> list[dict]:
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        out = []
        for _ in range(12):
            trial = study.ask()
            values = space.suggest(trial)
            study.tell(trial, values["optim.lr"])  # any objective
            out.append(values)
        return out

    first = draws(3)
    assert first == draws(3) and first != draws(4)
    for values in first:
        assert 1e-4 <= values["optim.lr"] <= 3e-2
        assert values["model.d_model"] in range(64, 257, 32)
        assert values["optim.batch_size"] in (8, 16, 32)


BAD = {
    "unknown key": ("[optim.nope]\nlow = 1\nhigh = 2\n", "[optim.nope]", "unknown key"),
    "outside the key's range": ("[optim.beta1]\nlow = 0.5\nhigh = 1.5\n", "[optim.beta1] = 1.5", "[0, 1)"),
    "budget key": ("[budget.seconds]\nlow = 1\nhigh = 2\n", "[budget.seconds]", "--trial-budget"),
    "low not below high": ("[optim.lr]\nlow = 0.1\nhigh = 0.01\n", "[optim.lr]", "not below high"),
    "log from zero": ("[optim.lr]\nlow = 0.0\nhigh = 0.1\nlog = true\n", "[optim.lr]", "low > 0"),
    "step not dividing": ("[model.d_model]\nlow = 64\nhigh = 250\nstep = 32\n", "[model.d_model]", "dividing"),
    "unknown field": ("[optim.lr]\nlow = 0.1\nhigh = 0.2\nscale = 'log'\n", "[optim.lr]", "'scale'"),
    "one choice": ("[optim.name]\nchoices = ['adamw']\n", "[optim.name]", "at least two"),
    "bad choice": ("[optim.name]\nchoices = ['adamw', 'sgd']\n", "[optim.name] = 'sgd'", "not a valid config value"),
    "no parameter": ("# nothing\n", "has no parameter", "[optim.lr]"),
    "not TOML": ("[optim.lr\n", "is not valid TOML", ""),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_spaces_are_refused_in_one_line_naming_file_and_key(tmp_path, case):
    text, where, why = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(FlopwiseError) as caught:
        read_space(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and where in message and why in message


def test_a_missing_space_file_is_named(tmp_path):
    with pytest.raises(FlopwiseError, match="does not exist"):
        read_space(tmp_path / "none.toml")


def test_total_budget_starts_only_trials_that_fit_and_frees_what_pruned_trials_left():
    budget = TotalBudget(total=15.0)
    for trial in range(15):  # fifteen 1-unit trials fit exactly (rounding tolerated)
        budget.start(trial, 1.0)
    assert not budget.can_start(1.0)
    budget.end(0, used=0.25)  # pruned at p = 0.25: three quarters come back
    assert budget.left == pytest.approx(0.75) and not budget.can_start(1.0)
    budget.end(1, used=0.5)
    assert budget.can_start(1.0)
    with pytest.raises(ValueError, match="already running"):
        budget.start(2, 1.0)
    assert TotalBudget.from_dict(budget.to_dict()) == budget


def test_a_trial_that_overran_its_budget_makes_later_trials_leave_that_margin():
    budget = TotalBudget(total=4.0)
    budget.start(0, 1.0)
    budget.end(0, used=1.025)  # a seconds budget's last step ran 2.5% past the end
    assert budget.overrun == pytest.approx(0.025)
    budget.start(1, 1.0)
    budget.end(1, used=0.9)  # ending early does not lower the margin
    assert budget.overrun == pytest.approx(0.025)
    budget.start(2, 1.0)  # 2.075 left: one more fits with its margin
    budget.end(2, used=1.0)
    assert budget.left == pytest.approx(1.075) and budget.can_start(1.0)
    budget.start(3, 1.0)
    budget.end(3, used=1.0)
    assert budget.can_start(0.07) and not budget.can_start(0.074)  # 0.075 left: 0.07175 fits, 0.07585 does not
    assert TotalBudget.from_dict(budget.to_dict()) == budget


def test_a_sum_of_tenths_fits_its_total():
    budget = TotalBudget(total=1.0)
    for trial in range(10):
        budget.start(trial, 0.1)
    assert budget.left == pytest.approx(0.0, abs=1e-12)
