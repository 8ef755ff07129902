"""``flopwise train``: pretrain under a budget, or resume and extend a run."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from flopwise.cli.eval import eval_table
from flopwise.cli.flags import add_data_method_flags, add_setup_flags, config_flags_given, config_from_args
from flopwise.errors import EXIT_INTERRUPTED, FlopwiseError
from flopwise.rundir import writing

if TYPE_CHECKING:  # these import torch or pydantic: a run imports them once it holds its folder
    from flopwise.config import RunConfig
    from flopwise.plan.planner import Plan
    from flopwise.runtime import Ranks
    from flopwise.session import Summary

TRAIN_EPILOG = """\
budgets (combine with commas; the first limit reached ends the run):
  90s, 3m, 1.5h        training seconds (evaluation and checkpoint time not counted)
  2e15flops, 3PFLOPs   model FLOPs (6N + attention per token, forward and backward)
  5M, 200k, 5e6tokens  tokens;   40steps   optimizer steps
  4MB, 500kB, 2MiB     a cap on final/'s bytes, beside a limit (--budget 2m,4MB): it stores its weights in
                       the highest precision that fits (fp32, bf16, int8, int4 with qat); docs/cli.md

examples:
  flopwise train --budget 3m                        # built-in corpus (Python stdlib), small model
  flopwise train --data ./my_texts/ --budget 2e15flops --out runs/mine
  flopwise train --config run.toml --set model.d_model=256 --set budget.tokens=5e6
  flopwise train --budget 40steps --stop-after 20steps --out runs/b   # stop early, as an interruption would
  flopwise train --resume runs/b                    # continue to the original budget
  flopwise train --resume runs/b --budget 80steps   # extend a finished run from before its decay
  flopwise train --init-from ./llama-folder --data ./domain_texts/ --budget 10m   # continue pretraining an HF model
  torchrun --nproc_per_node=2 -m flopwise train --budget 3m --out runs/ddp   # data parallel (--parallel fsdp)
  flopwise train --model large --memory 4GiB --budget 1h   # picks 8-bit states, checkpointing, GaLore... to fit
  flopwise train --method galore --method 8bit --set optim.name=adamw --budget 10m   # choose methods yourself
  flopwise train --method bf16_weights --method qat --budget 10m   # bf16 weights, int4-aware at the end
  flopwise train --budget 10m --set methods.progressive=false   # one shape throughout (by default a new run
                                                    # grows depth, window and batch over the budget)
  flopwise train --method grow_depth --set methods.grow_depth.at=0.5 --budget 1h   # depth growth alone, earlier
  flopwise train --budget 20m --auto                # model size from the scaling law (run `flopwise scan` first)
  flopwise train --budget 1h --target-loss 3.9      # give up early once the forecast cannot reach 3.9
  flopwise train --data code=./src:0.3 --data prose=./docs:0.7 --budget 10m   # a two-domain mixture
  flopwise train --budget 10m --online-mixture loss --reweight   # adaptive domain weights, sample reweighting
  flopwise train --budget 10m --teacher runs/small  # SALT: distill from a small finished run early in the budget
  flopwise train --budget 2e15flops --model 20m --distill-from runs/big   # KD from a larger run, its FLOPs counted

every run forecasts its final held-out loss from its curve so far (logged at each 0.1 of the budget).
one process writes a run folder at a time (a second one is refused at once); a new run starts only in an
empty --out (or one a run was killed in before it began): --overwrite deletes the run files there first.
checkpoints are verified before they are loaded, and a corrupt one is skipped for the newest intact one
(docs/run-folder.md says what a run folder guarantees).
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="pretrain a model under a budget", epilog=TRAIN_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Pretrain a decoder-only LM from raw text under a budget.")
    add_setup_flags(p, "the budget, e.g. 3m or 2e15flops or 5M,10m, with a size cap 2m,4MB (see below)")
    add_data_method_flags(p)
    add_out_flags(p)
    p.add_argument("--model", metavar="SIZE", help="named size: tiny, small (default), base, medium, large")
    p.add_argument("--init-from", metavar="RUN_OR_HF_MODEL",
                   help="continue pretraining a finished run (its final/) or a Llama-family Hugging Face model (a "
                        "folder, or a hub id found in the local hub cache); its tokenizer is used as is; with "
                        "--method prune_width, a smaller model cut from it")
    p.add_argument("--compile", action="store_true", help="use torch.compile (pays off on GPUs; ~1.1x on CPU)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="under torchrun: ddp (default; replicated weights) or fsdp (FSDP2, sharded weights, "
                        "gradients and optimizer states); optim.batch_size is the global batch")
    p.add_argument("--log", action="append", choices=("tensorboard", "wandb"),
                   help="also log to TensorBoard (run/tensorboard/) or Weights & Biases (honours WANDB_MODE="
                        "offline); repeatable; metrics.jsonl is always written")
    p.add_argument("--auto", action="store_true",
                   help="choose the model size for the budget first, as `flopwise plan` does, and run that plan")
    p.add_argument("--law", type=Path, help="law.json (or scan folder) for --auto and the loss forecast")
    p.add_argument("--target-loss", type=float, metavar="LOSS",
                   help="stop early once the forecast says the final held-out loss cannot get below LOSS")
    p.add_argument("--resume", type=Path, metavar="RUN",
                   help="continue an interrupted run from its newest intact checkpoint (from step 0 if it has "
                        "none yet), or extend a finished one with a larger --budget")
    p.add_argument("--stop-after", metavar="AMOUNT",
                   help="stop once this much is spent (e.g. 20steps), checkpointed as if interrupted")


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    _reject_with_resume(args)
    out = args.resume or args.out or default_out()
    with writing(out, new=not args.resume, overwrite=args.overwrite):  # first: a held folder is refused at once
        from flopwise.api import resume_held, run_held
        from flopwise.budget import Budget
        from flopwise.runtime import init_ranks, shutdown
        from flopwise.train.display import ProgressDisplay

        stop_after = Budget.parse(args.stop_after) if args.stop_after else None
        ranks = init_ranks(device_type(args))
        if not ranks.is_main:
            console = Console(quiet=True)
        display = ProgressDisplay(console)
        try:
            if args.resume:
                summary = resume_held(args.resume, args.budget, stop_after=stop_after, display=display)
            else:
                config = config_from_args(args)
                plan = None
                if args.auto:
                    plan = _auto_plan(config, ranks, console)
                    config = plan.apply(config)
                elif not ranks.distributed:
                    _say_what_the_law_would_choose(config, console)
                out = args.out or Path(ranks.broadcast_text(str(out)))  # rank 0's date and time
                summary = run_held(config, out, stop_after=stop_after, display=display,
                                   auto_plan=plan.to_dict() if plan else None)
        finally:
            shutdown(ranks)
    if not summary.finished:
        code = print_stopped(console, summary, "train", stop_after is not None)
        print_wall(console, summary)
        return code
    print_summary(console, summary)
    auto = json.loads((summary.run_dir / "plan.json").read_text()).get("auto_plan")
    if auto and summary.final_eval and auto["chosen"].get("predicted_loss") is not None:
        predicted, achieved = auto["chosen"]["predicted_loss"], summary.final_eval["loss"]
        console.print(f"planned: {predicted:.4f}; achieved: {achieved:.4f} ({(predicted - achieved) / achieved:+.2%})",
                      highlight=False)
    print_wall(console, summary)
    return 0


def add_out_flags(p: argparse.ArgumentParser) -> None:
    """--out and --overwrite, as every command that starts a run takes them."""
    p.add_argument("--out", type=Path, help="run folder (default: runs/<date-time>); it must hold no run and no "
                                            "other files")
    p.add_argument("--overwrite", action="store_true",
                   help="start the run in --out even where it holds a run or other files: the run files there "
                        "(config.toml, checkpoints/, final/, metrics.jsonl...) are deleted first; other files stay")


def default_out() -> Path:
    """runs/<date-time>: under torchrun, rank 0's is every rank's (it alone holds the folder)."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


FAMILY_FIELDS = {"d_model", "n_layers", "n_heads", "n_kv_heads", "head_size", "mlp_hidden"}  # what a plan sets
SHAPE_FIELDS = FAMILY_FIELDS | {"size", "init_from"}  # what else gives a run its own shape


def _auto_plan(config: RunConfig, ranks: Ranks, console: Console) -> Plan:
    """--auto: plan the budget (as `flopwise plan` does) and show the plan."""
    from flopwise.cli.plan import make_plan, print_plan

    if ranks.distributed:
        raise FlopwiseError("--auto plans in one process: run `flopwise plan` first, then torchrun with "
                            "--set model.d_model=... --set model.n_layers=... --set model.n_heads=...")
    fixed = sorted(FAMILY_FIELDS & config.model.model_fields_set)
    if fixed:
        raise FlopwiseError(f"model.{fixed[0]} is set, but --auto chooses the shape: drop one of the two")
    plan = make_plan(config)
    print_plan(console, plan)
    return plan


def _say_what_the_law_would_choose(config: RunConfig, console: Console) -> None:
    """A run of the default shape, where `flopwise scan` (or --law) fitted a law for this setup: say what the
    law would train instead and what it predicts for both, so the plan reaches runs without --auto."""
    from flopwise.cli.plan import make_plan
    from flopwise.runtime import choose_device, device_name
    from flopwise.scaling.law_file import law_for

    if SHAPE_FIELDS & config.model.model_fields_set or not {"seconds", "flops"} & set(config.budget.build().set_limits()):
        return
    law = law_for(config, device_name(choose_device(config.train.device)))
    if law.is_prior:
        return
    try:
        plan = make_plan(config, law=law)
    except FlopwiseError as err:
        console.print(f"the law fitted for this setup has no plan for this budget ({err})", highlight=False)
        return
    default = config.model.build(vocab_size=1)  # its width and depth (the plan's candidates give the rest)
    own = next((c for c in plan.candidates if (c.d_model, c.n_layers) == (default.d_model, default.n_layers)), None)
    chosen = plan.chosen
    console.print(f"the law fitted for this data and device ({law.path}) would train d_model {chosen.d_model} x "
                  f"{chosen.n_layers} ({chosen.non_embedding / 1e6:.2f}M) on {chosen.tokens / 1e6:.2f}M tokens"
                  + (f", predicted {chosen.predicted_loss:.4f}" if chosen.predicted_loss is not None else ""),
                  highlight=False)
    if own is chosen:
        console.print("this run's default shape is that plan", highlight=False)
    else:
        console.print(f"this run trains the default d_model {default.d_model} x {default.n_layers}"
                      + (f" ({own.non_embedding / 1e6:.2f}M) on {own.tokens / 1e6:.2f}M tokens, predicted "
                         f"{own.predicted_loss:.4f}" if own and own.predicted_loss is not None else "")
                      + ": add --auto to train the plan instead", highlight=False)


def device_type(args: argparse.Namespace) -> str:
    """cuda or cpu, for choosing the process group's backend before the config is read."""
    import torch

    name = args.device or "auto"
    return "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"


def _reject_with_resume(args: argparse.Namespace) -> None:
    """A resumed run keeps its config: refuse every flag that would change it, and --out, --overwrite and --auto."""
    if not args.resume:
        return
    given = config_flags_given(args) + [flag for flag, value in (
        ("--out", args.out), ("--overwrite", args.overwrite), ("--auto", args.auto)) if value]
    if given:
        raise FlopwiseError(f"{', '.join(given)} cannot change when resuming: a resumed run keeps its config "
                            "(only --budget and --stop-after apply)")


def print_stopped(console: Console, summary: Summary, command: str, stop_after_given: bool) -> int:
    """Say where an unfinished run stopped and how to continue it; the exit code: 0 when it stopped as asked
    (--stop-after) or for a reason of its own (the forecast), EXIT_INTERRUPTED after Ctrl-C."""
    reason = f" because {summary.stop_reason}" if summary.stop_reason else ""
    console.print(f"stopped at step {int(summary.meter.steps)}{reason}, with a checkpoint; continue with: "
                  f"flopwise {command} --resume {summary.run_dir}", highlight=False)
    return EXIT_INTERRUPTED if not stop_after_given and not summary.stop_reason else 0


def print_wall(console: Console, summary: Summary) -> None:
    """The last line: where this process's wall clock went (flopwise/wallclock.py), beside the budget it spent."""
    if summary.wall is not None:
        console.print(summary.wall.describe(), highlight=False)


def print_summary(console: Console, summary: Summary, table: bool = True) -> None:
    """What the run spent and saw; ``table``: the final held-out evaluation as well."""
    final = summary.final_eval
    m = summary.meter
    console.print(f"\n[bold]done[/bold]: {summary.run_dir}  ({int(m.steps)} steps, {m.tokens / 1e6:.2f}M tokens, "
                  f"{m.flops:.2e} FLOPs, {m.seconds:.1f}s training + {summary.eval_seconds:.1f}s eval + "
                  f"{summary.checkpoint_seconds:.1f}s checkpoints; final lr {summary.last_lr:.2e})", highlight=False)
    if summary.decay is not None:
        console.print(f"decay: {summary.decay.describe()}", highlight=False)
    for note in summary.notes:
        console.print(f"note: {note}", highlight=False)
    if summary.export:
        console.print(f"final/: {summary.export}", highlight=False)
    if summary.domain_epochs:
        console.print("data seen: " + ", ".join(f"{name} {epochs:.2f} epochs" for name, epochs
                                                in summary.domain_epochs.items()), highlight=False)
    if table:
        console.print(eval_table(final))
