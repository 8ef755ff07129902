"""``flopwise memory``: the estimated memory of a run's training step under each memory-method set,
and, with a cap, which fit and what ``flopwise train --memory`` would choose."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flopwise.budget import format_bytes
from flopwise.cli.flags import DEFAULT_RECIPE, config_from_args
from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig

EPILOG = """\
what is counted (bytes of one optimizer step; binary units):
  weights, gradients (all; with layerwise the most alive at once), optimizer states (moments,
  or 8-bit codes + one fp32 absmax per methods.8bit.block elements, and step counters; GaLore's
  projection matrices are their own column), activations saved for backward by one micro-batch,
  buffers (RoPE tables, SLTrain indices, the token batch), logits and cross-entropy tensors, and
  the peak: the largest of the moments where a step crests (start of backward, inside the last or
  first block's backward, the optimizer step). Not counted: allocator slack, kernel workspaces,
  and PyTorch's own few hundred MiB.

examples:
  flopwise memory --config run.toml
  flopwise memory --model large --batch 16 --memory 8GiB
  flopwise memory --set model.d_model=1024 --set model.n_layers=16 --set methods.use='["8bit"]'
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("memory", help="estimate a training step's peak memory, per memory-saving method set",
                            description="Estimate the peak memory of one training step of a config under each "
                                        "memory-saving method set the planner tries (and the configured one), "
                                        "and which fit memory.limit.",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="TOML or YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config key, e.g. model.d_model=256; repeatable, applied last")
    p.add_argument("--model", metavar="SIZE", help="named size: tiny, small (default), base, medium, large")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, metavar="NAME", help="'default' or 'baseline', as for train")
    p.add_argument("--batch", type=int, metavar="N", help="micro-batch in sequences (default: optim.batch_size)")
    p.add_argument("--memory", metavar="SIZE", help="memory cap to plan for, e.g. 8GiB (default: memory.limit)")


def cmd_memory(args: argparse.Namespace, console: Console) -> int:
    from flopwise.methods.choose import CANDIDATES, choose_methods, estimate_for, memory_methods_of
    from flopwise.resolve import resolve

    config = config_from_args(args)  # of the table's flags, this command has --model and --memory
    resolved = resolve(config, settle_memory=False)  # the table shows every candidate the cap could settle on
    model_cfg, dtype = resolved.model, resolved.compute_dtype
    batch = args.batch if args.batch is not None else config.optim.batch_size
    if batch <= 0:
        raise FlopwiseError(f"--batch {batch} must be a positive number of sequences")
    limit, optim, configured = config.memory.limit, config.optim, tuple(memory_methods_of(config.methods.use))
    method_sets = list(dict.fromkeys([*CANDIDATES, configured]))
    estimates = [estimate_for(model_cfg, batch, methods, config.methods, optim.name, dtype, grad_accum=optim.grad_accum)
                 for methods in method_sets]
    if not console.is_terminal:  # piped or captured: the table's many columns would be squeezed to 80
        console.width = max(console.width, 170)
    console.print(_table(estimates, model_cfg, batch, dtype, limit, configured))
    if limit is not None:
        try:
            choice = choose_methods(model_cfg, batch, config.methods, optim.name, limit, dtype, optim.grad_accum)
            console.print(f"planner: {choice.explanation}", highlight=False)
        except FlopwiseError as err:
            console.print(f"planner: {err}", highlight=False)
    return 0


def _table(estimates: list, model_cfg: ModelConfig, batch: int, dtype: str, limit: float | None,
           configured: tuple[str, ...]) -> Table:
    title = (f"estimated memory of one training step: {model_cfg.d_model}d x {model_cfg.n_layers} layers, vocab "
             f"{model_cfg.vocab_size:,}, micro-batch {batch} x {model_cfg.seq_len} tokens, {dtype} compute, "
             "fp32 weights (bf16 matrices with bf16_weights)")
    table = Table(title=title, caption="optimizer states exclude GaLore's projections (own column); "
                                       "see `flopwise memory --help` for what is counted")
    columns = ["methods", "optimizer", "weights", "gradients", "optimizer states", "GaLore projections",
               "activations", "buffers", "logits & loss", "peak", "crest"]
    if limit is not None:
        columns.append(f"fits {format_bytes(limit)}")
    for column in columns:
        table.add_column(column, justify="left" if column in ("methods", "optimizer", "crest") else "right")
    for e in estimates:
        name = ", ".join(e.methods) or "none"
        if e.methods == configured and configured:
            name += " (configured)"
        row = [name, e.optimizer, *(format_bytes(v) for v in (e.weights, e.gradients, e.optimizer_states,
                                                                e.projections, e.activations, e.buffers, e.logits,
                                                                e.peak)), e.peak_at]
        if limit is not None:
            row.append("yes" if e.peak <= limit else "no")
        table.add_row(*row)
    return table
