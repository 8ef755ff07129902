"""Population-based training (Jaderberg et al. 2017) on flopwise's run folders.

The total budget funds a population of whole trials (``total // trial``, less a margin for seconds budgets),
drawn at random from the space.  They
train in lockstep: every member runs to the next mark of budget progress (every ``interval``, 0.25 by default)
and stops there with a checkpoint.  Then each member of the bottom quantile (by held-out loss at the mark)
copies the run folder of a member of the top quantile (its weights, optimizer state, data position and curve so
far) and perturbs its learning rates by x0.8 or x1.2 (explore), and all go on to the next mark.  A copied run
resumes exactly, so each member spends its own trial budget once, however often it was overwritten.

``pbt.json`` in the sweep folder keeps the generation, which members reached its mark, which copies were made
and every member's lineage (the segments its final model was trained in, who trained them and at what rates),
written atomically after each change, so ``--resume`` goes on from where the sweep died.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flopwise import api
from flopwise.atomic import write_atomic, write_json_atomic
from flopwise.config import CONFIG_FILE, RunConfig, config_to_toml, load_run_config
from flopwise.errors import FlopwiseError
from flopwise.rundir import is_run_dir
from flopwise.sweep.optuna_dep import require_optuna
from flopwise.sweep.sampling import seed_sampler
from flopwise.sweep.space import SearchSpace
from flopwise.sweep.total import TotalBudget
from flopwise.sweep.trial import final_loss, progress_step, spent_by, trial_folder
from flopwise.train.display import ProgressDisplay

PBT_FILE = "pbt.json"
QUANTILE = 0.25  # the bottom quarter copies the top quarter (the paper's truncation selection)
PERTURB = (0.8, 1.2)  # explore: the learning rates times one of these
LR_KEYS = ("optim.lr", "optim.muon_lr")  # every learning rate of the run, scaled together
MIN_POPULATION = 2
# A seconds budget ends at the step nearest its end, so each member may overrun by part of a step; the whole
# population starts at once, before any overrun is seen, so it leaves this share per member (members of a
# 15-minute PBT of 1-minute trials overran by at most 0.75%, bench/RESULTS.md#sweeps).
SECONDS_MARGIN = 0.01


def population_size(left: float, trial: float) -> int:
    """How many whole trials what is left of the total funds (with the total budget's rounding tolerance)."""
    return math.floor(left / trial + 1e-9)


def marks(interval: float) -> list[float]:
    """The budget progress at which members stop, exploit and explore; the last is the end (1.0)."""
    count = max(1, round(1 / interval))
    return [round((k + 1) / count, 6) for k in range(count)]


def truncation(losses: dict[int, float], rng: random.Random) -> dict[int, tuple[int, float]]:
    """Exploit and explore at one mark: for each member of the bottom quantile by ``losses``, the member of the
    top quantile it copies and the factor on its learning rates."""
    ranked = sorted(losses, key=lambda n: (losses[n], n))
    cut = max(1, int(len(ranked) * QUANTILE))
    top, bottom = ranked[:cut], ranked[-cut:]
    return {n: (rng.choice(top), rng.choice(PERTURB)) for n in bottom}


class Population:
    """A PBT sweep's members, their run folders under ``trials_dir`` and the state in ``pbt.json``."""

    def __init__(self, folder: Path, trials_dir: Path, study: Any, first_config: Callable[[dict], RunConfig],
                 unit: str, seed: int, display: ProgressDisplay | None, say: Callable[[str], None]) -> None:
        self.folder, self.trials_dir, self.study, self.first_config = folder, trials_dir, study, first_config
        self.unit, self.seed, self.say = unit, seed, say
        self.display = display or ProgressDisplay.quiet()
        self.trials: dict[int, Any] = {}  # member number -> its Optuna trial, while the population runs
        path = folder / PBT_FILE
        self.state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def start(self, space: SearchSpace, budget: TotalBudget, trial_amount: float, interval: float) -> None:
        """Draw the population at random from the space (as the paper does) and reserve each member's whole
        trial budget in ``budget``."""
        margin = max(budget.overrun, SECONDS_MARGIN if self.unit == "seconds" else 0.0)
        size = population_size(budget.left, trial_amount * (1 + margin))
        if size < MIN_POPULATION:
            raise FlopwiseError(f"--strategy pbt needs a population of at least {MIN_POPULATION}: the budget "
                                f"funds {size} trial(s); raise --budget or lower --trial-budget")
        members = {}
        for _ in range(size):
            seed_sampler(self.study, self.seed, "pbt")
            trial = self.study.ask()
            values = space.suggest(trial)
            trial.set_user_attr("values", values)
            budget.start(trial.number, trial_amount)
            members[str(trial.number)] = {"spent": 0.0, "lineage": []}
        self.state = {"interval": interval, "generation": 0, "members": members, "reached": {}, "copied": []}
        self._save()

    def run(self) -> dict[str, Any]:
        """Train the population to the end, from wherever ``pbt.json`` says it stands; returns the state."""
        optuna = require_optuna()
        trials = self.trials = {t.number: optuna.trial.Trial(self.study, t._trial_id)
                                for t in self.study.get_trials(deepcopy=False)
                                if str(t.number) in self.state["members"]}
        schedule = marks(self.state["interval"])
        while self.state["generation"] < len(schedule):
            mark = schedule[self.state["generation"]]
            for number in sorted(trials):
                if str(number) not in self.state["reached"] and "error" not in self.state["members"][str(number)]:
                    self._advance(trials[number], mark)
            reached = {int(n): loss for n, loss in self.state["reached"].items()}
            self.say(f"pbt: p={mark:g} reached, held-out loss " + ", ".join(
                f"{n}: {loss:.4f}" for n, loss in sorted(reached.items())))
            if mark < 1.0:
                rng = random.Random(self.seed * 7_919 + self.state["generation"])
                for number, (source, factor) in sorted(truncation(reached, rng).items()):
                    if number not in self.state["copied"]:
                        self._copy(source, number, factor)
            self.state.update(generation=self.state["generation"] + 1, reached={}, copied=[])
            self._save()
        return self.state

    def lineage_spent(self, number: int) -> float:
        """What the segments that trained member ``number``'s final model spent, whoever trained them."""
        return sum(segment[self.unit] for segment in self.state["members"][str(number)]["lineage"])

    def _advance(self, trial: Any, mark: float) -> None:
        """Train one member from where its folder stands to ``mark`` (the end when 1.0), reporting its held-out
        loss at each evaluation; record the loss there and the segment in its lineage."""
        run_dir = trial_folder(self.trials_dir, trial.number)
        reached: dict[str, float] = {}

        def stop_at_mark(step: int, p: float, fields: dict[str, Any]) -> str | None:
            trial.report(fields["val_loss"], step=progress_step(p))
            reached.update(p=p, loss=fields["val_loss"])
            return f"pbt: p={mark:g} reached" if mark < 1.0 and p >= mark - 1e-9 else None

        member = self.state["members"][str(trial.number)]
        if member.get("segment_from") is None:  # where this segment starts, kept in case the process dies in it
            member["segment_from"] = spent_by(run_dir, self.unit)
            self._save()
        try:
            if not is_run_dir(run_dir):
                api.run(self.first_config(trial.user_attrs["values"]), run_dir, display=self.display,
                        after_eval=stop_at_mark)
            elif not (run_dir / "final").is_dir():  # a final/ means it ended before its process died
                api.resume(run_dir, display=self.display, after_eval=stop_at_mark)
        except FlopwiseError as err:  # a bad combination of values: this member leaves the population
            spent = spent_by(run_dir, self.unit) - member.pop("segment_from")
            member.update(error=str(err), spent=member["spent"] + spent)
            self._save()
            self.say(f"pbt: member {trial.number} failed: {err}")
            return
        if (run_dir / "final").is_dir():  # the end: its final evaluation, after the last mark's
            reached.update(p=1.0, loss=final_loss(run_dir))
        if "loss" not in reached:
            raise FlopwiseError(f"pbt member {trial.number} ('{run_dir}') had no evaluation before p={mark:g}: set "
                                f"train.eval_every to {self.state['interval']:g} or a divisor of it")
        spent = spent_by(run_dir, self.unit) - member.pop("segment_from")
        member["spent"] += spent
        member["lineage"].append({"trained_by": trial.number, "to_p": round(reached["p"], 4), self.unit: spent,
                                  **_rates(load_run_config(run_dir))})
        self.state["reached"][str(trial.number)] = reached["loss"]
        self._save()

    def _copy(self, source: int, number: int, factor: float) -> None:
        """Member ``number`` takes member ``source``'s run folder and lineage (exploit) with its learning rates
        times ``factor`` (explore).  The copy is made beside the folder and swapped in, so a crash leaves
        either the old folder or the new one, and the copy is simply made again on resume."""
        target = trial_folder(self.trials_dir, number)
        fresh, old = target.with_name(target.name + ".copy"), target.with_name(target.name + ".old")
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.copytree(trial_folder(self.trials_dir, source), fresh)
        config = load_run_config(fresh)
        scaled = config.replace(**{key: _get(config, key) * factor for key in LR_KEYS})
        write_atomic(fresh / CONFIG_FILE, config_to_toml(scaled))
        if target.exists():
            target.rename(old)
        fresh.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        members = self.state["members"]
        members[str(number)]["lineage"] = [dict(segment) for segment in members[str(source)]["lineage"]]
        members[str(number)].setdefault("copied", []).append(
            {"p": marks(self.state["interval"])[self.state["generation"]], "from": source, "lr_factor": factor})
        source_values = self.trials[source].user_attrs["values"]
        self.trials[number].set_user_attr("values", {**{key: _get(scaled, key) for key in source_values},
                                                     **_rates(scaled)})
        self.state["copied"].append(number)
        self._save()
        self.say(f"pbt: member {number} copies member {source}, learning rates x{factor:g}")

    def _save(self) -> None:
        write_json_atomic(self.folder / PBT_FILE, self.state)


def _get(config: RunConfig, key: str) -> Any:
    """The value of a dotted config key (``optim.lr``, ``methods.galore.rank``)."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _rates(config: RunConfig) -> dict[str, float]:
    return {key: float(_get(config, key)) for key in LR_KEYS}
