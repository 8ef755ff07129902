"""Trainer overhead: flopwise's full training loop against a minimal hand-written PyTorch loop on
the same model, optimizer, data and batch.

The flopwise arm is a real budgeted run (``budget.steps``), with its budget accounting, LR
schedule, per-step logging to metrics.jsonl and progress display; evaluation and checkpoints are
off, as the hand loop has none.  The hand loop is nanoGPT's: random windows from the token
memmap, forward, backward, clip, step, zero_grad, a cosine LR.  Arms alternate; prints the table
and writes bench/results/overhead.json.

    python bench/overhead.py --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from flopwise.config import load_config
from flopwise.model.gpt import GPT
from flopwise.optim.build import build_optimizer
from flopwise.session import start_new
from flopwise.train.display import ProgressDisplay
from flopwise.train.trainer import LoopState

HERE = Path(__file__).parent


def flopwise_loop(steps: int, overrides: list[str], work: Path, repeat: int) -> float:
    """Tokens per training second of a flopwise run of ``steps`` steps."""
    config = load_config(None, [f"budget.steps={steps}", "train.eval_every=0", "train.checkpoint_every=0",
                                *overrides])
    session = start_new(config, work / f"run{repeat}", ProgressDisplay(Console(quiet=True), live=False))
    session.write_run_files()
    session.evaluator = lambda model, tokens: {"loss": 0.0, "bpb": 0.0, "unigram_loss": 0.0, "domains": {}}  # final eval is not timed
    summary = session.run(LoopState())
    return summary.meter.tokens / summary.meter.seconds


def hand_loop(steps: int, overrides: list[str], data_session) -> float:
    """Tokens per second of the minimal loop on the same model shape, optimizer and token stream."""
    config = load_config(None, overrides)
    cfg, o = data_session.model_cfg, config.optim
    torch.manual_seed(0)
    model = GPT(cfg)
    optimizer = build_optimizer(model, o, torch.device("cpu"))
    tokens = data_session.data.corpus.train_tokens
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for step in range(steps):
        lr_mult = 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_mult
        offsets = rng.integers(0, len(tokens) - cfg.seq_len - 1, o.batch_size)
        window = torch.from_numpy(np.stack([tokens[i:i + cfg.seq_len + 1] for i in offsets]).astype(np.int64))
        _, loss = model(window[:, :-1], window[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the hand loop reads its loss too
    return steps * o.batch_size * cfg.seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config for both arms (default: the default recipe)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "overhead.json")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"hand-written loop": [], "flopwise trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            runs["flopwise trainer"].append(flopwise_loop(args.steps, args.overrides, Path(tmp), repeat))
            if repeat == 0:  # the same data and shape for the hand loop
                reference = start_new(load_config(None, ["budget.steps=1", *args.overrides]), Path(tmp) / "ref",
                                      ProgressDisplay(Console(quiet=True), live=False))
            runs["hand-written loop"].append(hand_loop(args.steps, args.overrides, reference))
    baseline = statistics.median(runs["hand-written loop"])
    table = Table(title=f"trainer overhead: {args.steps} steps, default recipe {' '.join(args.overrides)}")
    for column in ("loop", "tokens/s (median)", "runs", "ratio"):
        table.add_column(column, justify="right")
    rows = []
    for name, values in runs.items():
        median = statistics.median(values)
        rows.append({"loop": name, "tokens_per_s": median, "runs": values, "ratio": median / baseline})
        table.add_row(name, f"{median:,.0f}", ", ".join(f"{v:,.0f}" for v in values), f"{median / baseline:.3f}x")
    console = Console()
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "overrides": args.overrides, "rows": rows}, indent=1))
    console.print(f"written: {args.out}", highlight=False)


if __name__ == "__main__":
    main()
