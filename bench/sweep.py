"""Sweeps on the default corpus: 15-minute totals of 1-minute trials over learning rate x width x batch.

One arm per call, each written to bench/results/sweep_<arm>_seed<S>.json; ``--summary`` prints the tables
from all of them and writes bench/results/sweep.json.

  asha       flopwise sweep --strategy asha --seed S        (TPE sampling, successive-halving pruning)
  random     flopwise sweep --strategy random --seed S      (random search, every trial to its end)
  hyperband  flopwise sweep --strategy hyperband --workers 2 (two worker processes on one journal study)
  pbt        flopwise sweep --strategy pbt --seed S
  default    flopwise train --budget 1m, the sweep's base config at seeds 0, 1, 2 (the recipe's seed noise)
  rerun      each ASHA sweep's best.toml at 1 minute and seeds 0, 1, 2 (is the best config better, or its seed?)

Each sweep ran through the CLI as a user runs it.  ``--cores`` pins an arm to a set of cores (taskset) with
that many torch threads, so that two one-core arms can run side by side and compare like with like; run the
arms of a comparison side by side (asha next to random, same seed) and say so with the figures.

    python bench/sweep.py --arm asha --seed 0 --cores 0 &  python bench/sweep.py --arm random --seed 0 --cores 1
    python bench/sweep.py --summary
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pinning import pinned

HERE = Path(__file__).parent
RESULTS = HERE / "results"
WORK = Path(os.environ.get("FLOPWISE_BENCH_WORK", "/tmp/flopwise-sweep"))
TOTAL, TRIAL = os.environ.get("FLOPWISE_BENCH_TOTAL", "15m"), os.environ.get("FLOPWISE_BENCH_TRIAL", "1m")
BASE = ["--set", "train.eval_every=0.125"]  # eight rungs per trial
SPACE = """\
[optim.muon_lr]        # the learning rate of the blocks' matrices (Muon), most of the parameters
low = 0.0125
high = 0.2
log = true

[model.d_model]
choices = [64, 96, 128, 192, 256]

[optim.batch_size]
choices = [4, 8, 16, 32]
"""
DEFAULT_SEEDS = (0, 1, 2)


def run_sweep_arm(arm: str, seed: int, cores: str | None) -> dict[str, Any]:
    folder = WORK / f"{arm}_seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    space = WORK / "space.toml"
    space.write_text(SPACE, encoding="utf-8")
    strategy = "hyperband" if arm == "hyperband" else arm
    workers = ["--workers", "2"] if arm == "hyperband" else []
    prefix, env = pinned(cores)
    started, cpu_before = time.time(), _children_cpu()
    subprocess.run([*prefix, sys.executable, "-m", "flopwise", "sweep", "--budget", TOTAL, "--trial-budget", TRIAL,
                    "--space", str(space), "--out", str(folder), "--strategy", strategy, "--seed", str(seed),
                    *workers, *BASE], check=True, env=env)
    wall, cpu = time.time() - started, _children_cpu() - cpu_before
    return {"arm": arm, "seed": seed, "cores": cores, "wall_s": wall, "cpu_s": cpu, "busy_cores": cpu / wall,
            **describe(folder)}


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes and theirs: over the wall time, how many
    cores the sweep kept busy."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def describe(folder: Path) -> dict[str, Any]:
    """The sweep's trials as the study and their run folders recorded them, its best trial and when it was
    found, what it spent, and the rung-signal agreement over its finished trials."""
    import optuna

    from flopwise.sweep.folder import TRIALS
    from flopwise.sweep.signals import rank_agreement
    from flopwise.sweep.trial import spent_by, trial_folder, trial_values

    settings = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    study = optuna.load_study(study_name="flopwise", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / "journal.log"))))
    start = min(t.datetime_start for t in study.trials)
    trials = []
    for t in study.trials:
        run = trial_folder(folder / TRIALS, t.number)
        trials.append({"number": t.number, "state": t.state.name.lower(), "params": trial_values(t), "value": t.value,
                       "spent_s": spent_by(run, "seconds"), "lineage_s": t.user_attrs.get("lineage_s"),
                       "ended_after_s": (t.datetime_complete - start).total_seconds() if t.datetime_complete else None,
                       "error": t.user_attrs.get("error")})
    folders = sorted(int(p.name) for p in (folder / TRIALS).iterdir() if p.name.isdigit())
    once = all(_steps_once(trial_folder(folder / TRIALS, t["number"])) for t in trials)
    integrity = {"folders_are_trials": folders == sorted(t["number"] for t in trials), "each_step_once": once,
                 "reserved_left": settings["budget"]["reserved"]}
    complete = [t for t in trials if t["state"] == "complete"]
    best = min(complete, key=lambda t: t["value"])
    spent_by_then = sum(t["spent_s"] for t in trials
                        if t["ended_after_s"] is not None and t["ended_after_s"] <= best["ended_after_s"])
    return {"folder": str(folder), "strategy": settings["strategy"], "budget": settings["budget"], "trials": trials,
            "best": {**best, "found_after_s": best["ended_after_s"], "found_after_spent_s": spent_by_then,
                     "lineage_s": best["lineage_s"] or best["spent_s"]},
            "counts": {state: sum(t["state"] == state for t in trials) for state in ("complete", "pruned", "fail")},
            "rung_signals": rank_agreement(folder / TRIALS), "integrity": integrity}


def _steps_once(run_dir: Path) -> bool:
    """The run's logged steps rise strictly: no step was run twice (by two workers, or after a resume)."""
    from flopwise.rundir import read_metrics

    steps = [e["step"] for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "train"]
    return steps == sorted(set(steps))


def run_default_arm(cores: str | None) -> dict[str, Any]:
    """The sweep's base config, untouched by the space, at 1 minute and three seeds."""
    from flopwise.rundir import read_metrics

    prefix, env = pinned(cores)
    finals = {}
    for seed in DEFAULT_SEEDS:
        out = WORK / f"default_seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([*prefix, sys.executable, "-m", "flopwise", "train", "--budget", TRIAL, "--seed", str(seed),
                        "--out", str(out), *BASE], check=True, env=env, stdout=subprocess.DEVNULL)
        finals[seed] = [e for e in read_metrics(out / "metrics.jsonl") if e["event"] == "eval"][-1]["val_loss"]
    return {"arm": "default", "cores": cores, "finals": finals}


def run_rerun_arm(cores: str | None) -> dict[str, Any]:
    """Each ASHA sweep's best.toml again at 1 minute and the default recipe's three seeds: is the best trial's
    config better than the default recipe, or was its trial a lucky seed?"""
    from flopwise.rundir import read_metrics

    prefix, env = pinned(cores)
    finals: dict[str, dict[int, float]] = {}
    for best in sorted(WORK.glob("asha_seed*/best.toml")):
        for seed in DEFAULT_SEEDS:
            out = WORK / f"rerun_{best.parent.name}_seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run([*prefix, sys.executable, "-m", "flopwise", "train", "--config", str(best), "--budget",
                            TRIAL, "--seed", str(seed), "--out", str(out)], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            events = read_metrics(out / "metrics.jsonl")
            finals.setdefault(best.parent.name, {})[seed] = [e for e in events if e["event"] == "eval"][-1]["val_loss"]
    return {"arm": "rerun", "cores": cores, "finals": finals}


def summary(console: Console) -> None:
    arms = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("sweep_*_seed*.json"))]
    for arm in arms:  # described again from the sweep folder, where it still is, by today's code
        if arm["arm"] not in ("default", "rerun") and Path(arm.get("folder", WORK / f"{arm['arm']}_seed{arm['seed']}")).is_dir():
            arm.update(describe(Path(arm.get("folder", WORK / f"{arm['arm']}_seed{arm['seed']}"))))
    default = next((a for a in arms if a["arm"] == "default"), None)
    rerun = next((a for a in arms if a["arm"] == "rerun"), None)
    sweeps = [a for a in arms if a["arm"] not in ("default", "rerun")]
    table = Table(title=f"sweeps: {TOTAL} total, {TRIAL} trials, muon_lr x d_model x batch_size (default corpus)")
    for column in ("arm", "seed", "cores", "busy cores", "trials c/p/f", "best final loss", "found after (wall)",
                   "found after (spent)", "best's lineage", "spent of total", "trials whole, once"):
        table.add_column(column, justify="right")
    for a in sweeps:
        c, total = a["counts"], a["budget"]["total"]
        whole = a["integrity"]["folders_are_trials"] and a["integrity"]["each_step_once"] and not a["integrity"][
            "reserved_left"]
        table.add_row(a["arm"], str(a["seed"]), a["cores"] or "all", f"{a['busy_cores']:.2f}" if "busy_cores" in a
                      else "—", f"{c['complete']}/{c['pruned']}/{c['fail']}",
                      f"{a['best']['value']:.4f}", f"{a['best']['found_after_s'] / 60:.1f} min",
                      f"{a['best']['found_after_spent_s']:.0f} s",
                      f"{a['best']['lineage_s']:.0f} s ({a['best']['lineage_s'] / total:.0%})",
                      f"{a['budget']['spent']:.1f} of {total:.0f} s", "yes" if whole else "NO")
    console.print(table)
    by_arm: dict[str, list[float]] = {}
    for a in sweeps:
        by_arm.setdefault(a["arm"], []).append(a["best"]["value"])
    for arm, values in by_arm.items():
        console.print(f"{arm}: best final loss mean {sum(values) / len(values):.4f} over {len(values)} sweep(s)")
    if default:
        finals = list(default["finals"].values())
        mean, spread = sum(finals) / len(finals), max(finals) - min(finals)
        console.print(f"default recipe at {TRIAL}: {', '.join(f'{v:.4f}' for v in finals)} (mean {mean:.4f}, "
                      f"seed spread {spread:.4f})")
    if rerun:
        for sweep, by_seed in rerun["finals"].items():
            values = list(by_seed.values())
            console.print(f"{sweep} best.toml at {TRIAL}, seeds {', '.join(map(str, by_seed))}: "
                          f"{', '.join(f'{v:.4f}' for v in values)} (mean {sum(values) / len(values):.4f})")
    signals = Table(title="rung signal: Spearman with the final loss, finished trials of the random sweeps")
    for column in ("seed", "mark p", "trials", "held-out loss", "with a forecast", "forecast",
                   "held-out loss, same trials"):
        signals.add_column(column, justify="right")

    def shown(rho: float | None) -> str:
        return "—" if rho is None else f"{rho:.2f}"

    for a in sweeps:
        if a["arm"] == "random":
            for row in a["rung_signals"]:
                signals.add_row(str(a["seed"]), f"{row['p']:.2f}", str(row["trials"]), shown(row["loss_rho"]),
                                str(row["forecast_trials"]), shown(row["forecast_rho"]), shown(row["loss_rho_same"]))
    console.print(signals)
    (RESULTS / "sweep.json").write_text(json.dumps({"arms": arms}, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=("asha", "random", "hyperband", "pbt", "default", "rerun"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cores", help="pin the arm to these cores, e.g. 0 or 0,1 (taskset)")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    console = Console(width=200)
    if args.summary:
        summary(console)
        return
    runners = {"default": run_default_arm, "rerun": run_rerun_arm}
    result = (runners[args.arm](args.cores) if args.arm in runners
              else run_sweep_arm(args.arm, args.seed, args.cores))
    RESULTS.mkdir(exist_ok=True)
    name = f"sweep_{args.arm}_seed{0 if args.arm in runners else args.seed}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    console.print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
