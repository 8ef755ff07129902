"""``flopwise sft``, ``flopwise dpo`` and ``flopwise rl``: post-train a finished run or a Hugging Face model under a
budget."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from flopwise.cli.flags import DEFAULT_RECIPE, add_distill_flag, config_flags_given, config_from_args
from flopwise.cli.train import add_out_flags, default_out, print_stopped, print_summary
from flopwise.errors import FlopwiseError
from flopwise.rundir import writing

if TYPE_CHECKING:
    from flopwise.config import RunConfig
    from flopwise.session import Summary

SFT_EPILOG = """\
data (--data, repeatable; the format is detected per file from its first record):
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}        OpenAI-style
  {"conversations": [{"from": "human"|"gpt"|..., "value": ...}, ...], "system": ...}  ShareGPT
  {"instruction": ..., "input": ..., "output": ...}                                   Alpaca
without --data: built-in questions about the Python standard library, answered by its own docs.

the chat template is ChatML (<|im_start|>role ... <|im_end|>); its two tokens join the tokenizer and the
embedding grows by their rows.  The loss counts assistant tokens only.  Several conversations share a window
(each attends only to itself) unless --no-pack; a conversation longer than the window is cut, and counted.
learning rates start at optim.lr=3e-4, optim.muon_lr=1.5e-3 (measured on the built-in data; --set your own).

examples:
  flopwise train --budget 3m --out runs/base
  flopwise sft --init-from runs/base --budget 2m --out runs/sft
  flopwise sft --init-from runs/base --data chats.jsonl --data alpaca.jsonl --budget 10m --out runs/mine
  flopwise sft --init-from ./hf-llama-folder --method lisa --budget 20m --out runs/lisa
  flopwise sft --init-from runs/small --distill-from runs/big-sft --budget 5m --out runs/small-sft
  flopwise sft --resume runs/sft                      # after an interruption
  flopwise chat runs/sft
"""

DPO_EPILOG = """\
data (--data, repeatable): one pair per line,
  {"prompt": "..." | [messages], "chosen": "..." | [messages], "rejected": "..." | [messages]}
without --data: built-in pairs (the right docstring answer chosen, another function's rejected).

the reference is the starting model, frozen; its forward passes are counted in the budget.  Reported:
the held-out preference accuracy (chosen likelier than rejected under the model), the reward accuracy
and margin (the implicit rewards beta * log(pi / reference)).  learning rates start at optim.lr=1e-3,
optim.muon_lr=5e-3 (--set your own).

examples:
  flopwise dpo --init-from runs/sft --budget 2m --out runs/dpo
  flopwise dpo --init-from runs/sft --data prefs.jsonl --beta 0.3 --budget 10m --out runs/dpo
  flopwise chat runs/dpo
"""

RL_EPILOG = """\
tasks (--data, repeatable): one per line,
  {"prompt": "..." | [messages], "answer": "42", "verifier": "exact"|"numeric"|"regex", "tolerance": 0.01}
  exact: the reply's first line equals the answer; numeric: its first number is within tolerance; regex: the
  answer is a pattern the reply contains.  Without --data: built-in tasks made offline from the standard
  library (short arithmetic, which module defines a name, what a small Python expression evaluates to).
--reward MODULE:FUNCTION (or FILE.py:FUNCTION) scores instead: f(prompt, completion, record) -> float.  It is
  YOUR code and runs inside the training process: it is imported only when you name it.

each step samples rl.group completions (8) of optim.batch_size prompts (8) with the policy, up to
rl.max_response tokens (24); the advantage of a completion is its reward minus its group's mean, divided by the
group's std (rl.scale).  Prompts whose group got one reward for all are replaced by fresh ones (rl.allocation=
refill).  The rollouts' FLOPs and seconds are counted in the budget.  Reported: held-out pass@1 and mean reward,
greedy and sampled, from the starting model to the end.  More: --set rl.updates=2 (reuse each batch, clipped
ratio), rl.kl_beta=0.05 (KL to the starting model), docs/post-training.md.

examples:
  flopwise rl --init-from runs/sft --budget 3m --out runs/rl
  flopwise rl --init-from runs/sft --data tasks.jsonl --budget 10m --out runs/mine
  flopwise rl --init-from runs/sft --reward myrewards:score --data tasks.jsonl --budget 5m --out runs/custom
  flopwise chat runs/rl
"""


def register_sft(commands: argparse._SubParsersAction) -> None:
    sft = commands.add_parser("sft", help="supervised fine-tuning on conversations, under a budget",
                              epilog=SFT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Fine-tune a finished run (or a Hugging Face model) on chat "
                                          "conversations under a budget, with the loss on the assistant's "
                                          "tokens only, and write a model that chats (flopwise chat, or "
                                          "transformers' apply_chat_template and generate).")
    _add_flags(sft, "JSONL conversations")
    sft.add_argument("--no-pack", action="store_true",
                     help="one conversation per window (padded) instead of several packed together")
    add_distill_flag(sft)


def register_dpo(commands: argparse._SubParsersAction) -> None:
    dpo = commands.add_parser("dpo", help="direct preference optimization on chosen/rejected pairs, under a budget",
                              epilog=DPO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Tune a fine-tuned run (or a Hugging Face model) towards preferred "
                                          "replies with DPO (Rafailov et al. 2023) against the frozen starting "
                                          "model, under a budget.")
    _add_flags(dpo, "JSONL preference pairs")
    dpo.add_argument("--beta", type=float, help="DPO's beta: how strongly to stay near the reference (default 0.1)")


def register_rl(commands: argparse._SubParsersAction) -> None:
    rl = commands.add_parser("rl", help="reinforcement learning with verifiable rewards (GRPO), under a budget",
                             epilog=RL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                             description="Train a fine-tuned run (or a Hugging Face model) on tasks with checkable "
                                         "answers with GRPO (Shao et al. 2024): sample a group of replies per "
                                         "prompt, reward each, and reinforce those better than their group's "
                                         "mean, under a budget that counts the sampling too.")
    _add_flags(rl, "JSONL tasks")
    rl.add_argument("--group", type=int, help="completions sampled per prompt (default 8; at least 2)")
    rl.add_argument("--max-response", type=int, help="longest completion in tokens (default 24)")
    rl.add_argument("--reward", metavar="MODULE:FUNCTION",
                    help="your reward function instead of the tasks' verifiers: it runs your code (see below)")


def _add_flags(p: argparse.ArgumentParser, data: str) -> None:
    p.add_argument("--init-from", metavar="RUN_OR_HF_MODEL",
                   help="the starting model: a finished run folder, or a Llama-family Hugging Face folder or hub id")
    p.add_argument("--data", action="append", metavar="FILE", dest="chat_data",
                   help=f"{data}; repeatable (default: the built-in data)")
    p.add_argument("--budget", help="the budget, e.g. 2m or 1e14flops or 500k (tokens) or 40steps")
    add_out_flags(p)
    p.add_argument("--config", type=Path, help="TOML or YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config key, e.g. optim.lr=1e-3 or posttrain.heldout=0.1; repeatable")
    p.add_argument("--method", action="append", metavar="NAME",
                   help="a method acting on the model or optimizer, e.g. lora or lisa; repeatable "
                        "(docs/post-training.md lists those that apply to post-training)")
    p.add_argument("--memory", metavar="SIZE", help="memory cap, e.g. 4GiB: picks the memory-saving methods that fit")
    p.add_argument("--seed", type=int, help="fixes the data order, the held-out split and everything random")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="under torchrun: ddp (default) or fsdp (sharded); optim.batch_size is the global batch")
    p.add_argument("--log", action="append", choices=("tensorboard", "wandb"),
                   help="also log to TensorBoard or Weights & Biases; metrics.jsonl is always written")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run from its newest checkpoint")
    p.add_argument("--stop-after", metavar="AMOUNT",
                   help="stop once this much is spent (e.g. 20steps), checkpointed as if interrupted")
    p.set_defaults(recipe=DEFAULT_RECIPE)  # config_from_args reads it; post-training has no recipes


def cmd_sft(args: argparse.Namespace, console: Console) -> int:
    return _post_train(args, console, "sft")


def cmd_dpo(args: argparse.Namespace, console: Console) -> int:
    return _post_train(args, console, "dpo")


def cmd_rl(args: argparse.Namespace, console: Console) -> int:
    return _post_train(args, console, "rl")


# a stage's own flag -> the config key it sets
STAGE_FLAGS = {"--beta": "posttrain.beta", "--group": "rl.group", "--max-response": "rl.max_response",
               "--reward": "rl.reward"}


def _post_train(args: argparse.Namespace, console: Console, stage: str) -> int:
    _reject_with_resume(args)
    out = args.resume or args.out or default_out()
    with writing(out, new=not args.resume, overwrite=args.overwrite):  # first: a held folder is refused at once
        from flopwise.cli.train import device_type
        from flopwise.runtime import init_ranks, shutdown

        ranks = init_ranks(device_type(args))
        if not ranks.is_main:
            console = Console(quiet=True)
        try:
            summary = _run_stage(args, console, stage, args.out or Path(ranks.broadcast_text(str(out))))
        finally:
            shutdown(ranks)
    if not summary.finished:
        return print_stopped(console, summary, stage, args.stop_after is not None)
    print_posttrain_summary(console, summary)
    return 0


def _reject_with_resume(args: argparse.Namespace) -> None:
    """A resumed run keeps its config: refuse every flag that would change it, and --out and --overwrite."""
    if not args.resume:
        return
    given = config_flags_given(args) + [flag for flag, value in (
        ("--out", args.out), ("--overwrite", args.overwrite), ("--data", args.chat_data),
        ("--no-pack", getattr(args, "no_pack", False))) if value]
    given += [flag for flag in STAGE_FLAGS if _stage_flag(args, flag) is not None]
    if given:
        raise FlopwiseError(f"{', '.join(given)} cannot change when resuming: a resumed run keeps its config "
                            "(only --stop-after applies)")


def _run_stage(args: argparse.Namespace, console: Console, stage: str, out: Path) -> Summary:
    """A new run of ``stage`` from the flags into ``out``, or the resumed one, in the folder this process holds."""
    from flopwise.api import resume_held, run_held
    from flopwise.budget import Budget
    from flopwise.train.display import ProgressDisplay

    display = ProgressDisplay(console)
    stop_after = Budget.parse(args.stop_after) if args.stop_after else None
    if args.resume:
        return resume_held(args.resume, stop_after=stop_after, display=display)
    config = config_from_args(args)
    values = {"posttrain.stage": stage, **({"posttrain.data": [str(p) for p in args.chat_data]}
                                           if args.chat_data else {})}
    if getattr(args, "no_pack", False):
        values["posttrain.pack"] = False
    values.update({key: _stage_flag(args, flag) for flag, key in STAGE_FLAGS.items()
                   if _stage_flag(args, flag) is not None})
    config = config.replace(**values, **stage_defaults(config, stage))
    if not args.init_from and not config.model.init_from:
        raise FlopwiseError(f"{stage} needs a starting model: --init-from RUN (a finished run folder) or a "
                            "Hugging Face folder or hub id")
    return run_held(config, out, stop_after=stop_after, display=display)


def _stage_flag(args: argparse.Namespace, flag: str) -> Any:
    """A stage flag's value; None when not given or when this command has no such flag."""
    return getattr(args, flag.removeprefix("--").replace("-", "_"), None)


def stage_defaults(config: RunConfig, stage: str) -> dict[str, float]:
    """The stage's own defaults (its ``defaults``: flopwise/stages/) for the keys the user's flags, file and
    --set left unset."""
    from flopwise.stages import stage_class

    return {key: value for key, value in stage_class(stage).defaults.items()
            if key.split(".")[1] not in getattr(config, key.split(".")[0]).model_fields_set}


def print_posttrain_summary(console: Console, summary: Summary) -> None:
    """Steps and spend, then the starting model against the trained one on the same held-out records."""
    from flopwise.rundir import METRICS_FILE, read_metrics

    print_summary(console, summary, table=False)
    evals = [e for e in read_metrics(summary.run_dir / METRICS_FILE) if e["event"] == "eval"]
    if evals and evals[0]["step"] == 0:
        console.print(describe_start_and_end(evals[0], evals[-1]), highlight=False)
    console.print(f"chat with it: flopwise chat {summary.run_dir}", highlight=False)


def describe_start_and_end(start: dict[str, Any], end: dict[str, Any]) -> str:
    """One line comparing the starting model's eval event (step 0) with the final one, on the same records."""
    if "pass_greedy" in end:
        sampling = end["rollout_seconds"] / end["seconds"] if end["seconds"] else 0.0
        return (f"held-out pass@1: {start['pass_greedy']:.3f} (start) -> {end['pass_greedy']:.3f} greedy, "
                f"{start['pass_sampled']:.3f} -> {end['pass_sampled']:.3f} sampled ({end['prompts']} prompts); "
                f"mean reward {start['reward_greedy']:.3f} -> {end['reward_greedy']:.3f}\n"
                f"training {end['seconds']:.1f}s: rollouts {end['rollout_seconds']:.1f}s ({sampling:.0%}), "
                f"updates {end['seconds'] - end['rollout_seconds']:.1f}s")
    if "preference_accuracy" not in end:
        return (f"held-out assistant-token loss: {start['val_loss']:.4f} (start) -> {end['val_loss']:.4f} "
                f"({end['heldout_tokens']:,} tokens)")
    return (f"held-out preference accuracy: {start['preference_accuracy']:.3f} (start) -> "
            f"{end['preference_accuracy']:.3f}; reward accuracy {end['reward_accuracy']:.3f}, margin "
            f"{end['reward_margin']:+.3f} ({end['pairs']} pairs)")
