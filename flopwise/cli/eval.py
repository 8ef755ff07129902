"""``flopwise eval``: a run's held-out loss, perplexity and bits per byte, per domain; or, with ``--tasks``,
its accuracy on downstream tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from flopwise.atomic import write_json_atomic
from flopwise.cli.flags import add_checkpoint_flag
from flopwise.errors import FlopwiseError


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval", help="held-out loss per domain, or accuracy on tasks (--tasks)",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Evaluate a run's final model on its held-out split (writes eval.json); "
                                        "with --quantize int4, the model its 4-bit export would be (eval-int4.json); "
                                        "with --tasks, on downstream tasks scored by log-likelihood or exact match "
                                        "(tasks.json).",
                            epilog="examples:\n"
                                   "  flopwise eval runs/mine\n"
                                   "  flopwise eval runs/mine --tasks builtin          # tasks made from its held-out "
                                   "text\n"
                                   "  flopwise eval runs/mine --tasks next_line my_tasks/qa.jsonl --limit 200\n"
                                   "  flopwise eval runs/mine --tasks my_tasks/         # lm-eval task YAMLs "
                                   "(dataset_path: json)\n"
                                   "task format and built-in tasks: docs/tasks.md")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--tasks", nargs="+", metavar="NAME|FILE", default=None,
                   help="evaluate on tasks instead of held-out loss: a built-in task (next_line, rare_word, "
                        "doc_to_name, code_to_doc), 'builtin' for all that apply to the run's data, 'verifiable' "
                        "(flopwise rl's held-out tasks, greedy, for a chat model), a JSONL task file, an lm-eval "
                        "task YAML, or a folder of them")
    p.add_argument("--limit", type=int, default=None,
                   help="examples per task (default: all of a file's; 500 of each built-in task)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the built-in tasks' examples and of the bootstrap (default: the run's)")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on tokens per domain (default: all)")
    p.add_argument("--quantize", choices=("int4",), default=None,
                   help="round every block Linear's weight to int4 first (symmetric, round-to-nearest, one scale "
                        "per group of input columns) and write eval-int4.json instead of eval.json")
    p.add_argument("--group", type=int, default=None,
                   help="input columns per int4 scale (default: the run's methods.qat.group when it trained with "
                        "qat, else 32)")
    add_checkpoint_flag(p)
    p.add_argument("--device", default="auto")


def eval_table(result: dict, title: str = "held-out evaluation") -> Table:
    """The held-out evaluation per domain and overall (also what `train` prints at the end)."""
    table = Table(title=title)
    for column in ("domain", "loss (nats/token)", "perplexity", "bits/byte", "unigram baseline", "tokens"):
        table.add_column(column, justify="right" if column != "domain" else "left")
    rows = list(result["domains"].items()) + [("all", result)]
    for name, r in rows:
        table.add_row(name, f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['bpb']:.4f}",
                      f"{r['unigram_loss']:.4f}", f"{r['tokens']:,}")
    return table


def tasks_table(results: dict[str, dict], title: str = "tasks") -> Table:
    """Each task's accuracies, chance, and centered accuracy with its 95% bootstrap interval (narrow enough
    for an 80-column terminal; tasks.json has every figure)."""
    table = Table(title=title, caption="acc: highest log-likelihood; /char, /byte: per character, per byte "
                                       "(or exact match); centered: (score - chance) / (1 - chance) on /byte",
                  box=box.SIMPLE_HEAD)
    for column in ("task", "n", "acc", "/char", "/byte", "chance", "centered", "95% interval"):
        table.add_column(column, justify="left" if column == "task" else "right", no_wrap=True)
    for name, r in results.items():
        accuracy = r.get("acc_bytes", r.get("exact_match"))
        cells = [f"{r[key]:.3f}" if key in r else "-" for key in ("acc", "acc_norm")]
        table.add_row(name, f"{r['n']:,}", *cells, f"{accuracy:.3f}", f"{r['random']:.3f}", f"{r['centered']:+.3f}",
                      f"{r['low']:+.2f}..{r['high']:+.2f}")
    return table


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from flopwise.evaluate.run import evaluate_run

    if args.max_tokens is not None and args.max_tokens < 1:
        raise FlopwiseError(f"--max-tokens {args.max_tokens} must be a positive number of tokens per domain "
                            "(leave it out to evaluate all)")
    if args.group is not None and args.quantize is None:
        raise FlopwiseError(f"--group {args.group} sets the groups of --quantize int4: add --quantize int4, "
                            "or drop --group")
    if args.tasks is not None:
        return _eval_tasks(args, console)
    for flag, value in (("--limit", args.limit), ("--seed", args.seed)):
        if value is not None:
            raise FlopwiseError(f"{flag} {value} applies to --tasks: add --tasks, or drop {flag}")
    result = evaluate_run(args.run, args.device, args.max_tokens, args.checkpoint, args.quantize, args.group)
    if args.quantize is None:
        title, path = "held-out evaluation", args.run / "eval.json"
    else:
        title = f"held-out evaluation of the {args.quantize} model (round-to-nearest, groups of {result['group']})"
        path = args.run / f"eval-{args.quantize}.json"
    stored = result.get("artifact")
    console.print(eval_table(result, f"{title} of final/ as stored ({stored['precision']} weights)" if stored
                             else title))
    if stored and result["as_trained"]:  # a size budget's run: what it ships, then what it trained
        trained = result["as_trained"]
        console.print(f"the model as trained (fp32, before storing): held-out loss {trained['loss']:.4f}, bits/byte "
                      f"{trained['bpb']:.4f} on {trained['tokens']:,} tokens (the run's final evaluation)",
                      highlight=False)
    path.write_text(json.dumps(result, indent=1))
    console.print(f"written: {path}", highlight=False)
    return 0


def _eval_tasks(args: argparse.Namespace, console: Console) -> int:
    from flopwise.evaluate.run import evaluate_run_tasks

    if args.max_tokens is not None:
        raise FlopwiseError(f"--max-tokens {args.max_tokens} caps the held-out loss, not tasks: use --limit for "
                            "examples per task")
    if args.limit is not None and args.limit < 1:
        raise FlopwiseError(f"--limit {args.limit} must be a positive number of examples per task")
    result = evaluate_run_tasks(args.run, args.device, args.tasks, args.limit, args.seed, args.checkpoint,
                                args.quantize, args.group)
    suffix = f"-{args.quantize}" if args.quantize else ""
    path = args.run / f"tasks{suffix}.json"
    title = "tasks" if not args.quantize else f"tasks on the {args.quantize} model (groups of {result['group']})"
    console.print(tasks_table(result["tasks"], title))
    examples, seconds = (sum(r[key] for r in result["tasks"].values()) for key in ("n", "seconds"))
    console.print(f"{examples:,} examples in {seconds:.1f}s ({examples / seconds:.0f} examples/s)", highlight=False)
    write_json_atomic(path, result)
    console.print(f"written: {path}", highlight=False)
    return 0
