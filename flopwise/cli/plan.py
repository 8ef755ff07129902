"""``flopwise plan``: from a budget to a plan (model size, tokens, predicted loss), with the law fitted
on this data and device; also what ``train --auto`` runs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from flopwise.budget import format_count
from flopwise.cli.flags import add_setup_flags, config_from_args
from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.plan.planner import Plan
from flopwise.rundir import check_output
from flopwise.scaling.law_file import PlanningLaw, law_for

if TYPE_CHECKING:
    from flopwise.plan.device_profile import DeviceProfile

PLAN_EPILOG = """\
how: for a seconds budget every width of the shape family (depth = round(sqrt(d_model / 8))) is
timed on this device for a few real optimizer steps (cached), or costed from --device-profile's
declared peak, so the budget becomes the tokens each size can see; a FLOP budget needs no timing
(tokens = FLOPs / FLOPs per token), and a token budget is planned as the compute it is optimal for.
The law L(N, D) = E + A/N^alpha + B/D^beta scores each size at its (N, D), and the lowest wins.
The law is the one `flopwise scan` fitted for this data, recipe and device, else --law, else a
published prior (Chinchilla, refit by Besiroglu et al. 2024). Only a fitted law predicts a loss
('fitted'); the prior gives the allocation (N, tokens, tokens per parameter) without one ('prior').

examples:
  flopwise scan --budget 15m                     # pilot runs: fits the law for this data and device
  flopwise plan --budget 20m                     # the plan, its predicted loss and its assumptions
  flopwise plan --budget 1h --memory 16GiB --data ./texts/
  flopwise plan --budget 1.21e20flops            # Chinchilla's 1B row: no probe, in seconds
  flopwise plan --budget 2h --device-profile h100
                                                 # a budget on a GPU you do not have here
  flopwise train --budget 20m --auto             # plan, then run the plan
  flopwise fit runs/sweep-*  --out law.json      # fit a law to finished runs of your own
  flopwise plan --budget 20M --init-from hf/base --data new=./docs --data general=stdlib --replay new
                                                 # continued pretraining: how much general data to replay
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("plan", help="choose model size and tokens for a budget, and predict the loss",
                            description="Plan a run for a budget: the model size with the lowest predicted held-out "
                                        "loss on this device, its tokens, and the assumptions behind it.",
                            epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_flags(p, "the budget to plan for: seconds, FLOPs or tokens, e.g. 20m, 1h, 1e17flops or 2B")
    p.add_argument("--law", type=Path, help="law.json (or a scan folder) to plan with")
    p.add_argument("--device-profile", metavar="NAME|FILE",
                   help="plan a seconds budget for another device, from its declared peak FLOP/s and an assumed "
                        "MFU instead of probing this one: h100, h100-pcie, h200, a100, l4, mi300x, or a TOML file "
                        "(name, peak_flops.bf16 = 989e12, mfu = 0.4, memory_gib = 80, source = '...')")
    p.add_argument("--out", type=Path, help="also write the plan as JSON here")
    p.add_argument("--replay", metavar="DOMAIN",
                   help="continued pretraining: suggest the share of DOMAIN (the rest replays the other --data "
                        "domains) from pilot runs, by the CMR law (Gu et al. 2024); needs --init-from and a "
                        "token budget, e.g. --budget 20M --init-from base/ --data new=./docs --data general=stdlib")
    p.add_argument("--init-from", metavar="RUN_OR_HF_MODEL",
                   help="the model (a finished run or a Hugging Face model) that continued pretraining starts from")
    p.add_argument("--pilot-tokens", type=float, metavar="N",
                   help="tokens of each --replay pilot (default: a tenth of the budget's)")
    p.add_argument("--pilots", type=Path, metavar="FOLDER", help="where --replay puts its pilot runs "
                   "(default: replay/<date-time>)")
    p.add_argument("--replay-tolerance", type=float, default=0.05, metavar="NATS",
                   help="how far the general held-out loss may end above the start's (default 0.05, the paper's)")


SHOWN_BELOW_PLAN = 6  # candidate rows printed below the plan's; a cluster's budget tries ~50 widths


def make_plan(config: RunConfig, profile: DeviceProfile | None = None, law: PlanningLaw | None = None) -> Plan:
    """Plan ``config``'s budget with ``law``, by default its own (train.law, else the scan's for its setup,
    else the prior).  Only a seconds budget needs step times: from ``profile`` when given, else probed on
    this device."""
    from flopwise.plan.planner import Speed, plan_run
    from flopwise.resolve import resolve
    from flopwise.runtime import choose_device, device_name

    if config.model.init_from:
        raise FlopwiseError("planning chooses the model's shape, but --init-from fixes it: drop one of the two")
    vocab = resolve(config, settle_memory=False).model.vocab_size  # each candidate settles its own memory methods
    device = device_name(choose_device(config.train.device))
    speed = Speed(profile=profile)
    if config.budget.seconds is not None and profile is None:
        from flopwise.plan.throughput import ThroughputCache
        from flopwise.runtime import measure_matmul_peak

        throughput = ThroughputCache.for_config(config)
        speed = Speed(probe=throughput.step_seconds,
                      matmul_peak=measure_matmul_peak(throughput.device, throughput.dtype, throughput.cache_dir))
    plan = plan_run(config, vocab, law or law_for(config, device), device, speed)
    _check_spendable(config, plan, vocab, profile)
    return plan


def _check_spendable(config: RunConfig, plan: Plan, vocab_size: int, profile: DeviceProfile | None) -> None:
    """Refuse the plan with the check `train` refuses its run with: a budget without a seconds limit that the
    device could not spend in a year even at its best speed.  The device is the profile's, else the fastest one
    flopwise has a profile for: a FLOP or token budget is planned here for any device, with no probe, so only a
    budget that no device could spend (``--budget 1e40flops``) is refused."""
    from flopwise.budget import check_spendable
    from flopwise.model.flops import flops_per_token
    from flopwise.plan.device_profile import PROFILES, profile_dtype
    from flopwise.scaling.shapes import family_shape

    if profile is not None:
        peak, device = profile.peak_for(profile_dtype(config, profile)), profile.name
    else:
        fastest = max(PROFILES.values(), key=lambda shipped: max(shipped.peak_flops.values()))
        peak = max(fastest.peak_flops.values())
        device = f"{fastest.name}, the fastest device flopwise has a profile for"
    tokens = plan.tokens_per_step
    flops = flops_per_token(family_shape(config.model, plan.chosen.d_model, vocab_size)) * tokens
    check_spendable(config.budget.build(), {"tokens": tokens, "flops": flops, "steps": 1}, peak, device)


def print_plan(console: Console, plan: Plan) -> None:
    if not console.is_terminal:  # piped or captured: keep the table's columns readable
        console.width = max(console.width, 120)
    stated = plan.loss_basis == "fitted"
    timed = plan.chosen.tokens_per_second is not None
    best = plan.candidates.index(plan.chosen)
    shown = plan.candidates[max(0, best - SHOWN_BELOW_PLAN):]
    hidden = len(plan.candidates) - len(shown)
    table = Table(title="candidates (one row per width tried; N: non-embedding parameters)",
                  caption=f"{hidden} smaller widths tried, not shown (--out writes every candidate)" if hidden else None)
    columns = ["d_model", "layers", "N"] + (["tokens/s"] if timed else []) + ["tokens", "tokens/N", "steps"]
    for column in columns + (["predicted loss"] if stated else []):
        table.add_column(column, justify="right")
    for c in shown:
        mark = " <- plan" if c == plan.chosen else ""
        cells = [str(c.d_model), str(c.n_layers), f"{c.non_embedding / 1e6:,.2f}M"]
        cells += [f"{c.tokens_per_second:,.0f}"] if timed else []
        cells += [format_count(c.tokens), f"{c.tokens / c.non_embedding:.1f}", f"{c.steps:,}"]
        if stated:
            cells.append(("-" if c.predicted_loss is None else f"{c.predicted_loss:.4f}") + mark)
        else:
            cells[-1] += mark
        table.add_row(*cells)
    console.print(table)
    chosen = plan.chosen
    text = (f"[bold]plan[/bold]: d_model {chosen.d_model} x {chosen.n_layers} layers, {chosen.n_heads} heads "
            f"({chosen.non_embedding / 1e6:,.2f}M non-embedding parameters), {format_count(chosen.tokens)} tokens in "
            f"{chosen.steps:,} steps")
    if chosen.predicted_loss is not None:
        spread = f" ({plan.interval[0]:.4f}-{plan.interval[1]:.4f}, 10-90% of bootstrap fits)" if plan.interval else ""
        text += f"; predicted final held-out loss {chosen.predicted_loss:.4f}{spread} (fitted)"
    else:
        text += f"; no loss predicted ({plan.loss_basis}: see 'loss' below)"
    console.print(text, highlight=False)
    if plan.law_is_prior:
        console.print("[yellow]the law is a prior from other data: it sizes the run, it does not predict your loss; "
                      "`flopwise scan --budget 15m` fits one here[/yellow]")
    console.print("assumptions:")
    for line in plan.assumptions:
        console.print(f"  - {line}", highlight=False)


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    check_output("--out", args.out, folder=False)
    check_output("--pilots", args.pilots, folder=True)
    config = config_from_args(args)
    if args.replay:
        return cmd_replay(args, config, console)
    profile = None
    if args.device_profile:
        from flopwise.plan.device_profile import load_profile

        profile = load_profile(args.device_profile)
    plan = make_plan(config, profile)
    print_plan(console, plan)
    if args.out:
        from flopwise.atomic import write_json_atomic

        write_json_atomic(args.out, plan.to_dict())
        console.print(f"written: {args.out}", highlight=False)
    budget = args.budget or config.budget.build().as_flag()
    console.print(f"run it: flopwise train --budget {budget} --auto" + (f" --law {args.law}" if args.law else ""),
                  highlight=False)
    return 0


def cmd_replay(args: argparse.Namespace, config: RunConfig, console: Console) -> int:
    from flopwise.atomic import write_json_atomic
    from flopwise.replay.pilots import print_replay, suggest_replay

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
