"""``flopwise sweep``: many trials of a run under one total budget, searched and pruned by Optuna."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from flopwise.budget import Budget
from flopwise.cli.flags import add_setup_flags, config_from_args
from flopwise.cli.report import print_sweep
from flopwise.cli.train import device_type
from flopwise.errors import FlopwiseError
from flopwise.sweep.folder import TRIALS

SWEEP_EPILOG = """\
search space (--space, TOML; one table per config key):
  [optim.lr]                 low = 1e-4   high = 3e-2   log = true
  [model.d_model]            low = 64     high = 256    step = 32
  [optim.batch_size]         choices = [8, 16, 32]

strategies: asha (default: TPE sampling, successive-halving pruning at the evaluation marks), hyperband,
random (random search, no pruning), pbt (population-based training: a random population trains in lockstep;
at every --pbt-interval of budget progress the bottom quarter copies a top-quarter member's checkpoint and
scales its learning rates by 0.8 or 1.2).  A trial starts only when the rest of --budget can fund it whole;
a pruned trial gives back what it did not spend.  best.toml reruns the best trial: flopwise train --config.
--seed seeds the sampler and is every trial's train.seed.

examples:
  flopwise sweep --budget 15m --trial-budget 1m --space space.toml --out sweeps/lr
  flopwise sweep --budget 200steps --trial-budget 20steps --space space.toml --strategy random --seed 1
  flopwise sweep --budget 15m --trial-budget 1m --space space.toml --strategy pbt --set train.eval_every=0.125
  torchrun --nproc-per-node 2 -m flopwise sweep --budget 1h --trial-budget 5m --space space.toml \\
      --set train.parallel=ddp                       # each trial on both processes
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("sweep", help="many trials under one total budget (Optuna)", epilog=SWEEP_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Search config values under one total budget: Optuna draws each trial's "
                                        "values, each trial is a real run under --trial-budget, and the pruner "
                                        "stops weak trials at their evaluation marks.")
    add_setup_flags(p, "the total budget of all trials, e.g. 15m (one limit, in the trial budget's unit)")
    p.add_argument("--trial-budget", help="each trial's budget, e.g. 1m")
    p.add_argument("--space", type=Path, help="the search space (TOML, see below)")
    p.add_argument("--out", type=Path, help="sweep folder (default: sweeps/<date-time>)")
    p.add_argument("--strategy", default="asha", help="asha (default), hyperband, random or pbt")
    p.add_argument("--pbt-interval", type=float, default=0.25, metavar="P",
                   help="pbt: the budget progress between exploit-and-explore steps (default 0.25)")
    p.add_argument("--storage", metavar="URL",
                   help="an Optuna storage to share the study and its total --budget between machines: an RDB "
                        "URL, or the path of a journal file on a shared disk (default: a journal file in the sweep "
                        "folder)")
    p.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS",
                   help="with an RDB --storage: each running trial's heartbeat interval; a trial silent for twice "
                        "that (its machine died) is taken over by another machine (default 60)")
    p.add_argument("--rung-signal", default="loss", choices=("loss", "forecast"),
                   help="what a trial reports at each evaluation mark for pruning: its held-out loss (default) "
                        "or the forecast of its final loss")
    p.add_argument("--workers", type=int, default=1,
                   help="trial processes on this machine, the cores split between them (default 1)")
    p.add_argument("--resume", type=Path, metavar="SWEEP",
                   help="go on with a sweep whose process died: ended trials are kept, a running one resumes from "
                        "its checkpoint, and new trials use what is left of the total")


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from flopwise.report.sweep import load_sweep
    from flopwise.runtime import init_ranks, shutdown
    from flopwise.sweep.driver import SweepPlan, check_plan, resume_sweep, run_sweep
    from flopwise.sweep.optuna_dep import require_optuna
    from flopwise.sweep.trial import follow_trials

    def say(line: str) -> None:
        console.print(line, highlight=False)

    if not args.resume:
        missing = [flag for flag, value in (("--budget", args.budget), ("--trial-budget", args.trial_budget),
                                            ("--space", args.space)) if not value]
        if missing:
            raise FlopwiseError(f"flopwise sweep needs {', '.join(missing)} (or --resume SWEEP): e.g. --budget 15m "
                                "--trial-budget 1m --space space.toml")
        plan = SweepPlan(Budget.parse(args.budget), Budget.parse(args.trial_budget), args.strategy, args.seed or 0,
                         args.rung_signal, args.pbt_interval)
        check_plan(plan)
    require_optuna()
    ranks = init_ranks(device_type(args))
    try:
        folder = args.resume or args.out or Path(ranks.broadcast_text(str(Path("sweeps") /
                                                                          time.strftime("%Y%m%d-%H%M%S"))))
        if not ranks.is_main:
            follow_trials(folder / TRIALS, ranks)
            return 0
        if args.resume:
            resume_sweep(folder, say=say, ranks=ranks)
        else:
            run_sweep(folder, config_from_args(args), args.space, plan, args.storage, say=say, workers=args.workers,
                      ranks=ranks, heartbeat=args.heartbeat)
    finally:
        shutdown(ranks)
    print_sweep(console, load_sweep(folder))
    return 0
