"""Trainer overhead: flopwise's full training loop against a minimal hand-written PyTorch loop on
the same model, optimizer, data and batch.

The flopwise arm is a real budgeted run (``budget.steps``), with its budget accounting, LR
schedule, per-step logging to metrics.jsonl and progress display; evaluation and checkpoints are
off, as the hand loop has none.  The hand loop is nanoGPT's: random windows from the token
memmap, forward, backward, clip, step, zero_grad, a cosine LR.  Arms alternate; prints the table
and writes bench/results/overhead.json.  A profile table then splits the hand loop's step into its
phases (data, forward, backward, clip, optimizer), so the time of each is seen.

    python bench/overhead.py --steps 60 --repeats 3
    python bench/overhead.py --nanogpt --out bench/results/overhead_nanogpt.json   # nanoGPT's CPU shape
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
# nanoGPT's README CPU command: --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128, 300 iterations
NANOGPT_SHAPE = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.seq_len=64", "optim.batch_size=12"]
PHASES = ("data", "forward", "backward", "clip", "optimizer")


def flopwise_loop(steps: int, overrides: list[str], work: Path, repeat: int) -> float:
    """Tokens per training second of a flopwise run of ``steps`` steps."""
    config = load_config(None, [f"budget.steps={steps}", "train.eval_every=0", "train.checkpoint_every=0",
                                "methods.progressive=false", *overrides])  # the hand loop's one shape
    session = start_new(config, work / f"run{repeat}", ProgressDisplay(Console(quiet=True), live=False))
    session.write_run_files()
    session.evaluation.final = lambda: {"loss": 0.0, "bpb": 0.0, "unigram_loss": 0.0, "domains": {}}  # not timed
    summary = session.run(LoopState())
    return summary.meter.tokens / summary.meter.seconds


def hand_loop(steps: int, overrides: list[str], data_session, phases: dict[str, float] | None = None) -> float:
    """Tokens per second of the minimal loop on the same model shape, optimizer and token stream; with
    ``phases``, the seconds of each phase are added to it (a clock read between phases: no device here
    runs asynchronously, so each read is that phase's time)."""
    config = load_config(None, overrides)
    cfg, o = data_session.model_cfg, config.optim
    torch.manual_seed(0)
    model = GPT(cfg)
    optimizer = build_optimizer(model, o, torch.device("cpu"))
    tokens = data_session.stage.data.corpus.train_tokens
    rng = np.random.default_rng(0)
    clock = {name: 0.0 for name in PHASES}
    start = time.perf_counter()
    for step in range(steps):
        mark = time.perf_counter()
        lr_mult = 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_mult
        offsets = rng.integers(0, len(tokens) - cfg.seq_len - 1, o.batch_size)
        window = torch.from_numpy(np.stack([tokens[i:i + cfg.seq_len + 1] for i in offsets]).astype(np.int64))
        mark = _lap(clock, "data", mark)
        _, loss = model(window[:, :-1], window[:, 1:])
        mark = _lap(clock, "forward", mark)
        loss.backward()
        mark = _lap(clock, "backward", mark)
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        mark = _lap(clock, "clip", mark)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the hand loop reads its loss too
        _lap(clock, "optimizer", mark)
    seconds = time.perf_counter() - start
    if phases is not None:
        for name, value in clock.items():
            phases[name] = phases.get(name, 0.0) + value
    return steps * o.batch_size * cfg.seq_len / seconds


def _lap(clock: dict[str, float], phase: str, mark: float) -> float:
    now = time.perf_counter()
    clock[phase] += now - mark
    return now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config for both arms (default: the default recipe)")
    parser.add_argument("--nanogpt", action="store_true", help="nanoGPT's CPU shape (128 wide, 4 layers, 4 heads, "
                        "window 64, batch 12), before --set")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "overhead.json")
    args = parser.parse_args()
    if args.nanogpt:
        args.overrides = NANOGPT_SHAPE + args.overrides
    phases: dict[str, float] = {}
    runs: dict[str, list[float]] = {"hand-written loop": [], "flopwise trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            runs["flopwise trainer"].append(flopwise_loop(args.steps, args.overrides, Path(tmp), repeat))
            if repeat == 0:  # the same data and shape for the hand loop
                reference = start_new(load_config(None, ["budget.steps=1", *args.overrides]), Path(tmp) / "ref",
                                      ProgressDisplay(Console(quiet=True), live=False))
            runs["hand-written loop"].append(hand_loop(args.steps, args.overrides, reference, phases))
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
    total_steps = args.steps * args.repeats
    flopwise_ms = 1000 * reference.tokens_per_step / statistics.median(runs["flopwise trainer"])
    profile = {name: 1000 * value / total_steps for name, value in phases.items()}
    profile["flopwise's own bookkeeping (step time - hand loop's)"] = flopwise_ms - sum(profile.values())
    steps_table = Table(title="where a step's time goes (hand loop's phases, ms per step)")
    for column in ("phase", "ms", "share"):
        steps_table.add_column(column, justify="right")
    for name, ms in profile.items():
        steps_table.add_row(name, f"{ms:.2f}", f"{ms / flopwise_ms:.0%}")
    console.print(steps_table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "overrides": args.overrides, "rows": rows,
                                    "profile_ms": profile, "flopwise_step_ms": flopwise_ms}, indent=1))
    console.print(f"written: {args.out}", highlight=False)


if __name__ == "__main__":
    main()
