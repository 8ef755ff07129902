"""`flopwise plan`, `flopwise fit` and `flopwise scan`: from a budget to a plan, with a law fitted
on this data and device."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from flopwise.budget import format_amount
from flopwise.cli_config import add_setup_flags, config_from_args
from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.plan.law_file import LAW_FILE, PlanningLaw, cached_law_path, law_for, read_law, setup_key
from flopwise.plan.planner import Plan

if TYPE_CHECKING:
    from flopwise.plan.scan import Scan

PLAN_EPILOG = """\
how: every width of the shape family (depth = round(sqrt(d_model / 8))) is timed on this device
for a few real optimizer steps (cached), so the budget becomes the tokens each size can see;
the law L(N, D) = E + A/N^alpha + B/D^beta predicts each size's final held-out loss, and the
lowest wins. The law is the one `flopwise scan` fitted for this data, recipe and device, else
--law, else a published prior (Chinchilla, refit by Besiroglu et al. 2024) whose losses are not
your data's: scan first.

examples:
  flopwise scan --budget 15m                     # pilot runs: fits the law for this data and device
  flopwise plan --budget 20m                     # the plan, its predicted loss and its assumptions
  flopwise plan --budget 1h --memory 16GiB --data ./texts/
  flopwise train --budget 20m --auto             # plan, then run the plan
  flopwise fit runs/sweep-*  --out law.json      # fit a law to finished runs of your own
  flopwise plan --budget 20M --init-from hf/base --data new=./docs --data general=stdlib --replay new
                                                 # continued pretraining: how much general data to replay
"""

SCAN_EPILOG = """\
design: three sizes of the shape family whose longest pilot sees between 1.5 and 40 tokens per
parameter (the sizes that would be compute-optimal for budgets of 0.5x to 13x that pilot), each
trained for t, then extended to 2t and 4t from its checkpoint before the learning-rate decay
(warmup-stable-decay makes each length a fully annealed run of that budget, for 4.6t instead of
7t). The law is fitted to the final held-out losses (Huber loss on log L, as Hoffmann et al.
2022), with 200 bootstrap refits for its uncertainty, and saved for this setup so that
`flopwise plan` and `train --auto` use it.  Pilots that end before their size's loss has settled
after its steepest fall (on the default corpus: the sudden drop when a model learns to copy, at
1-3M tokens) are left out when 6 others remain; otherwise the law says it will be optimistic
beyond its pilots, and the scan prints how long a scan of those sizes would pilot past the drop
on this device, and what adding a length to this one (--extend) would take.

examples:
  flopwise scan --budget 15m --out scans/stdlib
  flopwise scan --budget 10m --data ./texts/ --set optim.batch_size=16
  flopwise scan --extend scans/stdlib --budget 20m   # add lengths 8t, 16t, ... to a finished scan
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("plan", help="choose model size and tokens for a budget, and predict the loss",
                            description="Plan a run for a budget: the model size with the lowest predicted held-out "
                                        "loss on this device, its tokens, and the assumptions behind it.",
                            epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_flags(p, "the budget to plan for: seconds or FLOPs, e.g. 20m, 1h or 1e17flops")
    p.add_argument("--law", type=Path, help="law.json (or a scan folder) to plan with")
    p.add_argument("--out", type=Path, help="also write the plan as JSON here")
    p.add_argument("--replay", metavar="DOMAIN",
                   help="continued pretraining: suggest the share of DOMAIN (the rest replays the other --data "
                        "domains) from pilot runs, by the CMR law (Gu et al. 2024); needs --init-from and a "
                        "token budget, e.g. --budget 20M --init-from base/ --data new=./docs --data general=stdlib")
    p.add_argument("--init-from", metavar="HF_MODEL", help="the model that continued pretraining starts from")
    p.add_argument("--pilot-tokens", type=float, metavar="N",
                   help="tokens of each --replay pilot (default: a tenth of the budget's)")
    p.add_argument("--pilots", type=Path, metavar="FOLDER", help="where --replay puts its pilot runs "
                   "(default: replay/<date-time>)")
    p.add_argument("--replay-tolerance", type=float, default=0.05, metavar="NATS",
                   help="how far the general held-out loss may end above the start's (default 0.05, the paper's)")

    p = commands.add_parser("fit", help="fit the scaling law L(N, D) to finished runs",
                            description="Fit L(N, D) = E + A/N^alpha + B/D^beta to the final held-out losses of "
                                        "finished runs (or a scan's pilots), with bootstrap intervals.  Runs that "
                                        "end before their size's training curve has settled after its steepest "
                                        "fall follow a steeper law: they are left out when at least 6 others "
                                        "remain, else the output warns that the law will be optimistic.",
                            epilog="example:\n  flopwise fit runs/sweep-* --out law.json\n"
                                   "  flopwise plan --budget 20m --law law.json",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="run folders and/or scan folders")
    p.add_argument("--out", type=Path, help="write the fitted law here (law.json) for plan --law")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits for the intervals (default 200)")

    p = commands.add_parser("scan", help="pilot runs that fit the scaling law for this data and device",
                            description="Spend a small budget on pilot runs (sizes x lengths) and fit the law "
                                        "that `flopwise plan` then uses for this data, recipe and device.",
                            epilog=SCAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_flags(p, "wall-clock time the whole scan may take, e.g. 15m")
    p.add_argument("--out", type=Path, help="scan folder (default: scans/<date-time>)")
    p.add_argument("--extend", type=Path, metavar="SCAN",
                   help="a finished scan folder: spend --budget on lengths twice its longest (then 4x, ...), "
                        "each size continuing from before its longest pilot's decay, and refit; give the "
                        "setup flags the scan was run with")


def make_plan(config: RunConfig) -> Plan:
    """Plan ``config``'s budget with its law (train.law, else the scan's for its setup, else the prior),
    probing throughput."""
    from flopwise.plan.memory_command import shape_from_config
    from flopwise.plan.planner import plan_run
    from flopwise.plan.throughput import ThroughputCache
    from flopwise.train.device import device_name, measure_matmul_peak

    if config.model.init_from:
        raise FlopwiseError("planning chooses the model's shape, but --init-from fixes it: drop one of the two")
    throughput = ThroughputCache.for_config(config)
    device = device_name(throughput.device)
    return plan_run(config, shape_from_config(config).vocab_size, law_for(config, device), throughput.step_seconds,
                    device, matmul_peak=measure_matmul_peak(throughput.device, throughput.dtype, throughput.cache_dir))


def print_plan(console: Console, plan: Plan) -> None:
    if not console.is_terminal:  # piped or captured: keep the table's columns readable
        console.width = max(console.width, 120)
    table = Table(title="candidates (one row per width tried; N: non-embedding parameters)")
    for column in ("d_model", "layers", "N", "tokens/s", "tokens", "tokens/N", "steps", "predicted loss"):
        table.add_column(column, justify="right")
    for c in plan.candidates:
        mark = " <- plan" if c == plan.chosen else ""
        table.add_row(str(c.d_model), str(c.n_layers), f"{c.non_embedding / 1e6:.2f}M", f"{c.tokens_per_second:,.0f}",
                      f"{c.tokens / 1e6:.2f}M", f"{c.tokens / c.non_embedding:.1f}", f"{c.steps:,}",
                      f"{c.predicted_loss:.4f}{mark}")
    console.print(table)
    chosen = plan.chosen
    spread = f" ({plan.interval[0]:.4f}-{plan.interval[1]:.4f}, 10-90% of bootstrap fits)" if plan.interval else ""
    console.print(f"[bold]plan[/bold]: d_model {chosen.d_model} x {chosen.n_layers} layers, {chosen.n_heads} heads "
                  f"({chosen.non_embedding / 1e6:.2f}M non-embedding parameters), {chosen.tokens / 1e6:.2f}M tokens in "
                  f"{chosen.steps:,} steps; predicted final held-out loss {chosen.predicted_loss:.4f}{spread}",
                  highlight=False)
    if plan.law_is_prior:
        console.print("[yellow]the law is a prior from other data: its loss is not a prediction for yours; "
                      "`flopwise scan --budget 15m` fits one here[/yellow]")
    console.print("assumptions:")
    for line in plan.assumptions:
        console.print(f"  - {line}", highlight=False)


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    import json

    config = config_from_args(args)
    if args.replay:
        return cmd_replay(args, config, console)
    plan = make_plan(config)
    print_plan(console, plan)
    if args.out:
        from flopwise.atomic import write_json_atomic

        write_json_atomic(args.out, plan.to_dict())
        console.print(f"written: {args.out}", highlight=False)
    budget = args.budget or json.dumps(config.budget.model_dump(exclude_none=True))
    console.print(f"run it: flopwise train --budget {budget} --auto" + (f" --law {args.law}" if args.law else ""),
                  highlight=False)
    return 0


def cmd_replay(args: argparse.Namespace, config: RunConfig, console: Console) -> int:
    from flopwise.atomic import write_json_atomic
    from flopwise.plan.replay_pilots import print_replay, suggest_replay

    tokens = config.budget.build().tokens
    if tokens is None:
        raise FlopwiseError("--replay needs the continued run's budget in tokens (e.g. --budget 20M): the CMR law "
                            "is a function of tokens")
    pilots = args.pilots or Path("replay") / time.strftime("%Y%m%d-%H%M%S")
    suggestion = suggest_replay(config, args.replay, tokens, args.pilot_tokens, pilots, console,
                                args.replay_tolerance)
    print_replay(console, suggestion)
    write_json_atomic(args.out or pilots / "replay.json", suggestion)
    console.print(f"written: {args.out or pilots / 'replay.json'}", highlight=False)
    return 0


def print_law(console: Console, law: PlanningLaw) -> None:
    from flopwise.plan.scaling import parameter_intervals

    console.print(f"[bold]law[/bold]: {law.law.describe()}", highlight=False)
    if law.early:
        console.print(f"early regime: {law.early_regime_note()}", highlight=False)
    if law.bootstrap:
        table = Table(title=f"parameters: fit and 10-90% interval over {len(law.bootstrap)} bootstrap refits")
        for column in ("parameter", "fit", "low", "high"):
            table.add_column(column, justify="right")
        for name, (low, high) in parameter_intervals(law.bootstrap).items():
            table.add_row(name, f"{getattr(law.law, name):.4g}", f"{low:.4g}", f"{high:.4g}")
        console.print(table)
    if law.runs:
        table = Table(title="runs: final held-out loss against the law")
        for column in ("run", "N", "tokens", "loss", "law", "error"):
            table.add_column(column, justify="right")
        for run in law.runs:
            predicted = float(law.law.loss(run["non_embedding"], run["tokens"]))
            table.add_row(run["name"], f"{run['non_embedding'] / 1e6:.2f}M", f"{run['tokens'] / 1e6:.2f}M",
                          f"{run['val_loss']:.4f}", f"{predicted:.4f}",
                          f"{(predicted - run['val_loss']) / run['val_loss']:+.2%}")
        console.print(table)
    console.print(f"throughput: runs trained at {law.throughput_ratio:.3f}x the probe's tokens/s; early-forecast decay "
                  f"factor kappa {law.kappa.kappa_mean:.4f} +- {law.kappa.kappa_std:.4f} ({law.kappa.n_runs} runs)",
                  highlight=False)


def cmd_fit(args: argparse.Namespace, console: Console) -> int:
    from flopwise.plan.fitting import collect_records, law_from_records

    law = law_from_records(collect_records(args.runs), samples=args.bootstrap)
    print_law(console, law)
    if args.out:
        law.save(args.out)
        console.print(f"written: {args.out} (use it with: flopwise plan --law {args.out})", highlight=False)
    return 0


def cmd_scan(args: argparse.Namespace, console: Console) -> int:
    from flopwise.plan.fitting import SCAN_FILE
    from flopwise.plan.memory_command import shape_from_config
    from flopwise.plan.scan import Scan, design_scan
    from flopwise.plan.shapes import family_shape
    from flopwise.plan.throughput import ThroughputCache
    from flopwise.train.device import device_name

    started = time.perf_counter()
    config = config_from_args(args)
    budget = config.budget.build()
    if set(budget.set_limits()) != {"seconds"}:
        raise FlopwiseError(f"scan --budget {budget.describe()}: give the scan's wall-clock time only, e.g. 15m")
    if config.model.init_from:
        raise FlopwiseError("a scan trains models of several sizes from scratch: drop --init-from")
    decay_start = config.schedule.build().decay_start
    throughput = ThroughputCache.for_config(config)
    key = setup_key(config, device_name(throughput.device))
    if args.extend:
        scan = reopen_scan(args, config, key, decay_start, budget.seconds - (time.perf_counter() - started), console)
        law = scan.extend(key)
    else:
        out = args.out or Path("scans") / time.strftime("%Y%m%d-%H%M%S")
        if (out / SCAN_FILE).exists():
            raise FlopwiseError(f"'{out}' already holds a scan: choose another --out, or add to it with --extend")
        vocab = shape_from_config(config).vocab_size
        design = design_scan(budget.seconds, lambda width: family_shape(config.model, width, vocab),
                             lambda cfg: throughput.tokens_per_second(cfg, config), decay_start)
        sizes = ", ".join(f"{s.d_model} ({s.non_embedding / 1e6:.2f}M)" for s in design.sizes)
        lengths = ", ".join(f"{t:.0f}s" for t in design.lengths())
        remaining = budget.seconds - (time.perf_counter() - started)
        console.print(f"scan: sizes d_model {sizes}; lengths {lengths} (extended from one run per size); "
                      f"{remaining:.0f}s left", highlight=False)
        scan = Scan(config, out, design, remaining, console)
        law = scan.run(key)
    law.save(cached_law_path(throughput.cache_dir, key))
    print_law(console, law)
    if law.early and not law.early_left_out:
        advise_past_early_regime(scan, console)
    console.print(f"done in {time.perf_counter() - started:.0f}s: {scan.out / 'law.json'}; `flopwise plan` and "
                  "`flopwise train --auto` now use this law for this data, recipe and device", highlight=False)
    return 0


def reopen_scan(args: argparse.Namespace, config: RunConfig, key: str, decay_start: float, seconds: float,
                console: Console) -> Scan:
    """The finished scan ``--extend`` names, checked to be of this setup."""
    from flopwise.plan.fitting import SCAN_FILE
    from flopwise.plan.scan import Scan

    folder = args.extend
    if args.out:
        raise FlopwiseError(f"--extend adds to the scan in '{folder}': drop --out")
    if not (folder / SCAN_FILE).is_file() or not (folder / LAW_FILE).is_file():
        raise FlopwiseError(f"--extend '{folder}': no finished scan there (scan.json and law.json); give the --out "
                            "folder of a finished `flopwise scan`")
    if read_law(folder).key != key:
        raise FlopwiseError(f"--extend '{folder}': that scan was run with other data, recipe or device; give the "
                            "setup flags (--data, --config, --set, ...) it was run with")
    scan = Scan.reopen(config, folder, decay_start, seconds, console)
    console.print(f"extending scan {folder}: lengths twice its longest ({scan.design.lengths()[-1]:.0f}s) and on, "
                  f"while {seconds:.0f}s last", highlight=False)
    return scan


def advise_past_early_regime(scan: Scan, console: Console) -> None:
    """What would pilot past the early regime: a longer scan of these sizes, or one more length of this one."""
    from flopwise.plan.scan import scan_seconds_past_early_regime, scan_wall_seconds

    design = scan.design
    needed = scan_seconds_past_early_regime(scan.records, design.decay_start)
    extension = design.extension_seconds()
    this_design = scan_wall_seconds(design.unit_seconds, len(design.sizes), design.decay_start)
    fresh = (f"a scan of these sizes needs at least {format_amount('seconds', needed)} "
             f"(`flopwise scan --budget {math.ceil(needed / 60)}m`), or " if needed and needed > this_design else "")
    console.print(f"[yellow]to pilot past the early regime on this device: {fresh}add a length twice the longest to "
                  f"this one (`flopwise scan --extend {scan.out} --budget {math.ceil(extension / 60)}m`)[/yellow]",
                  highlight=False)
