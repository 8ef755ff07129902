"""The ``flopwise`` command: train under a budget, evaluate, sample."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flopwise import __version__
from flopwise.budget import Budget
from flopwise.cli_config import add_data_method_flags, add_setup_flags, config_from_args
from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.bench_command import cmd_bench
from flopwise.bench_command import register as _add_bench
from flopwise.data.summary_command import cmd_data
from flopwise.data.summary_command import register as _add_data
from flopwise.plan.commands import cmd_fit, cmd_plan, cmd_scan
from flopwise.plan.commands import register as _add_planning
from flopwise.plan.memory_command import cmd_memory
from flopwise.plan.memory_command import register as _add_memory
from flopwise.report.command import cmd_report
from flopwise.report.command import register as _add_report

EXIT_INTERRUPTED = 130

TRAIN_EPILOG = """\
budgets (combine with commas; the first limit reached ends the run):
  90s, 3m, 1.5h        training seconds (evaluation and checkpoint time not counted)
  2e15flops, 3PFLOPs   model FLOPs (6N + attention per token, forward and backward)
  5M, 200k, 5e6tokens  tokens;   40steps   optimizer steps

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
  flopwise train --budget 20m --auto                # model size from the scaling law (run `flopwise scan` first)
  flopwise train --budget 1h --target-loss 3.9      # give up early once the forecast cannot reach 3.9
  flopwise train --data code=./src:0.3 --data prose=./docs:0.7 --budget 10m   # a two-domain mixture
  flopwise train --budget 10m --online-mixture loss --reweight   # adaptive domain weights, sample reweighting
  flopwise train --budget 10m --teacher runs/small  # SALT: distill from a small finished run early in the budget

every run forecasts its final held-out loss from its curve so far (logged at each 0.1 of the budget).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flopwise", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the best language model a fixed budget allows: state the budget "
                    "(seconds, FLOPs, tokens, steps), give it text, and the run ends exactly at the "
                    "budget with its learning rate fully annealed.")
    parser.add_argument("--version", action="version", version=f"flopwise {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_eval(commands)
    _add_sample(commands)
    _add_export(commands)
    _add_report(commands)
    _add_bench(commands)
    _add_memory(commands)
    _add_planning(commands)
    _add_data(commands)
    return parser


def _add_train(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="pretrain a model under a budget", epilog=TRAIN_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Pretrain a decoder-only LM from raw text under a budget.")
    add_setup_flags(p, "the budget, e.g. 3m or 2e15flops or 5M,10m (see below)")
    add_data_method_flags(p)
    p.add_argument("--out", type=Path, help="run folder (default: runs/<date-time>)")
    p.add_argument("--model", metavar="SIZE", help="named size: tiny, small (default), base, medium, large")
    p.add_argument("--init-from", metavar="HF_MODEL",
                   help="continue pretraining a Llama-family Hugging Face model (a folder, or a hub id found in "
                        "the local hub cache); its tokenizer is used as is")
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
                   help="continue an interrupted run, or extend a finished one with a larger --budget")
    p.add_argument("--stop-after", metavar="AMOUNT",
                   help="stop once this much is spent (e.g. 20steps), checkpointed as if interrupted")


def _add_eval(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval", help="held-out loss, perplexity and bits per byte, per domain",
                            description="Evaluate a run's final model on its held-out split.")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on tokens per domain (default: all)")
    _add_checkpoint_flag(p)
    p.add_argument("--device", default="auto")


def _add_checkpoint_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", action="store_true",
                   help="use the run's newest checkpoint instead of its final model (an unfinished run)")


def _add_sample(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("sample", help="generate text from a run's final model",
                            description="Generate text from a run's final model, printed as it is sampled "
                                        "(KV-cached decoding).",
                            epilog="examples:\n  flopwise sample runs/a --prompt 'def main(' --top-p 0.9\n"
                                   "  flopwise sample runs/a --prompt 'import os' --temperature 0   # greedy",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default 50; 0: off)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with this much probability, e.g. 0.9")
    p.add_argument("--seed", type=int, default=0)
    _add_checkpoint_flag(p)
    p.add_argument("--device", default="auto")


def _add_export(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("export", help="save a run's model as a Hugging Face transformers folder",
                            description="Write a run's model as a folder that transformers loads with "
                                        "AutoModelForCausalLM and AutoTokenizer: LlamaForCausalLM (or "
                                        "Qwen3ForCausalLM with QK-norm), safetensors, tokenizer and generation "
                                        "config. (A finished run's final/ folder already is one.)",
                            epilog="example:\n  flopwise export runs/a --to hf/my-model\n  python -c \"from "
                                   "transformers import AutoModelForCausalLM as M; M.from_pretrained('hf/my-model')\"",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--to", type=Path, required=True, metavar="FOLDER", help="new (or empty) folder to write")
    _add_checkpoint_flag(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)
    try:
        handler = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "export": cmd_export,
                   "report": cmd_report, "bench": cmd_bench, "memory": cmd_memory,
                   "plan": cmd_plan, "fit": cmd_fit, "scan": cmd_scan, "data": cmd_data}[args.command]
        return handler(args, console)
    except FlopwiseError as err:
        print(f"flopwise: error: {err}", file=sys.stderr)
        return err.exit_code


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    from flopwise.model.flops import count_parameters
    from flopwise.train.display import ProgressDisplay
    from flopwise.train.distributed import init_ranks, shutdown
    from flopwise.train.session import open_for_resume, start_new
    from flopwise.train.trainer import LoopState

    ranks = init_ranks(_device_type(args))
    if not ranks.is_main:
        console = Console(quiet=True)
    display = ProgressDisplay(console)
    stop_after = Budget.parse(args.stop_after) if args.stop_after else None
    try:
        if args.resume:
            _reject_with_resume(args)
            budget = Budget.parse(args.budget) if args.budget else None
            session, state = open_for_resume(args.resume, budget, display)
        else:
            config = config_from_args(args)
            plan = _auto_plan(config, ranks, console) if args.auto else None
            out = args.out or Path(ranks.broadcast_text(str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))))
            session = start_new(config, out, display)
            session.auto_plan = plan.to_dict() if plan else None
            session.write_run_files()
            state = LoopState()
        cfg = session.model_cfg
        parallel = (f"; {ranks.world_size} processes ({session.config.train.parallel})" if ranks.distributed else "")
        console.print(f"model: {cfg.d_model}d x {cfg.n_layers} layers, {count_parameters(cfg)['total']:,} "
                      f"parameters; budget {session.config.budget.build().describe()}; {session.tokens_per_step:,} "
                      f"tokens/step; device {session.device.type} ({str(session.dtype).removeprefix('torch.')})"
                      f"{parallel}", highlight=False)
        summary = session.run(state, stop_after)
    finally:
        shutdown(ranks)
    if not summary.finished:
        reason = f" because {summary.stop_reason}" if summary.stop_reason else ""
        console.print(f"stopped at step {int(summary.meter.steps)}{reason}, with a checkpoint; continue with: "
                      f"flopwise train --resume {summary.run_dir}", highlight=False)
        return EXIT_INTERRUPTED if stop_after is None and not summary.stop_reason else 0
    print_summary(console, summary)
    auto = json.loads((summary.run_dir / "plan.json").read_text()).get("auto_plan")
    if auto and summary.final_eval:
        predicted, achieved = auto["chosen"]["predicted_loss"], summary.final_eval["loss"]
        console.print(f"planned: {predicted:.4f}; achieved: {achieved:.4f} ({(predicted - achieved) / achieved:+.2%})",
                      highlight=False)
    return 0


def _auto_plan(config: RunConfig, ranks, console: Console):
    """--auto: plan the budget (as `flopwise plan` does), show the plan and set the config's shape to it."""
    from flopwise.plan.commands import make_plan, print_plan

    if ranks.distributed:
        raise FlopwiseError("--auto plans in one process: run `flopwise plan` first, then torchrun with "
                            "--set model.d_model=... --set model.n_layers=... --set model.n_heads=...")
    fixed = sorted({"d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden"} & config.model.model_fields_set)
    if fixed:
        raise FlopwiseError(f"model.{fixed[0]} is set, but --auto chooses the shape: drop one of the two")
    plan = make_plan(config)
    print_plan(console, plan)
    plan.apply(config)
    return plan


def _device_type(args: argparse.Namespace) -> str:
    """cuda or cpu, for choosing the process group's backend before the config is read."""
    import torch

    name = args.device or "auto"
    return "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"


def _reject_with_resume(args: argparse.Namespace) -> None:
    fixed = {"--data": args.data, "--val-data": args.val_data, "--include": args.include, "--config": args.config,
             "--set": args.overrides, "--model": args.model, "--tokenizer": args.tokenizer, "--seed": args.seed,
             "--out": args.out, "--init-from": args.init_from, "--recipe": args.recipe != "default" or None,
             "--parallel": args.parallel, "--log": args.log, "--memory": args.memory, "--method": args.method,
             "--auto": args.auto or None, "--law": args.law, "--target-loss": args.target_loss}
    given = [flag for flag, value in fixed.items() if value]
    if given:
        raise FlopwiseError(f"{', '.join(given)} cannot change when resuming: a resumed run keeps its config "
                            "(only --budget and --stop-after apply)")


def print_summary(console: Console, summary) -> None:
    final = summary.final_eval
    m = summary.meter
    console.print(f"\n[bold]done[/bold]: {summary.run_dir}  ({int(m.steps)} steps, {m.tokens / 1e6:.2f}M tokens, "
                  f"{m.flops:.2e} FLOPs, {m.seconds:.1f}s training + {summary.eval_seconds:.1f}s eval + "
                  f"{summary.checkpoint_seconds:.1f}s checkpoints; final lr {summary.last_lr:.2e})", highlight=False)
    if summary.domain_epochs:
        console.print("data seen: " + ", ".join(f"{name} {epochs:.2f} epochs" for name, epochs
                                                in summary.domain_epochs.items()), highlight=False)
    console.print(eval_table(final))


def eval_table(result: dict) -> Table:
    table = Table(title="held-out evaluation")
    for column in ("domain", "loss (nats/token)", "perplexity", "bits/byte", "unigram baseline", "tokens"):
        table.add_column(column, justify="right" if column != "domain" else "left")
    rows = list(result["domains"].items()) + [("all", result)]
    for name, r in rows:
        table.add_row(name, f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['bpb']:.4f}",
                      f"{r['unigram_loss']:.4f}", f"{r['tokens']:,}")
    return table


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from flopwise.evaluate.final import evaluate_run

    result = evaluate_run(args.run, args.device, args.max_tokens, args.checkpoint)
    console.print(eval_table(result))
    (args.run / "eval.json").write_text(json.dumps(result, indent=1))
    console.print(f"written: {args.run / 'eval.json'}", highlight=False)
    return 0


def cmd_sample(args: argparse.Namespace, console: Console) -> int:
    from flopwise.evaluate.final import load_run_model, stream_sample
    from flopwise.train.device import choose_device

    model, tokenizer = load_run_model(args.run, choose_device(args.device), args.checkpoint)
    sys.stdout.write(args.prompt)
    for piece in stream_sample(model, tokenizer, args.prompt, args.max_tokens, args.temperature,
                               args.top_k or None, args.top_p, args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from flopwise.evaluate.final import export_run

    folder = export_run(args.run, args.to, args.checkpoint)
    console.print(f"written: {folder} (load with transformers' AutoModelForCausalLM.from_pretrained and "
                  "AutoTokenizer.from_pretrained)", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
