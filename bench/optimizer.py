"""Muon's options against today's Muon, and torch.optim.Muon against flopwise's batched Muon.

1. Held-out loss: `flopwise train` with the default recipe (plus ``--set``) at a fixed ``--budget Nsteps``, for
   each arm and seed, one run at a time (two would share the cores): today's Muon; + Polar Express; + the
   iteration in bf16 (torch.optim.Muon's precision); + NorMuon; + a Muon weight decay; + that decay made
   cautious; NorMuon with Polar Express and the cautious decay.  Today's recipe decays nothing (its embeddings
   are tied and Muon's matrices had no decay), so cautious decay is measured against the same decay applied
   plainly.  Evaluation marks, checkpoints and forecasts are off; the final held-out loss is scored on the
   whole held-out split.  Runs already in the JSON are not rerun.
2. Step time: in one process, the optimizer step of each arm (and torch.optim.Muon's) on one model with the same
   gradients, arms alternating one step at a time, many times; ms per step and the ratio to today's Muon, with
   forward + backward timed alongside, so the ratio of a whole step is seen too.  On ``--threads`` threads (1
   by default: on a shared machine one thread's times are the steadier; 0: torch's default).
3. torch.optim.Muon against flopwise's Muon in one hand-written loop (one shape: progressive training off), the
   same initialization, batches and WSD schedule, AdamW for the rest alike: held-out loss after N steps.

    python bench/optimizer.py --set model.size=tiny                 # this machine's CPU budget
    python bench/optimizer.py                                       # the default recipe, on a quiet machine

Writes bench/results/optimizer.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from flopwise.config import load_config
from flopwise.model.gpt import GPT
from flopwise.optim.build import build_optimizer
from flopwise.optim.optimizer import FlopwiseOptimizer
from flopwise.optim.routing import is_hidden_matrix
from flopwise.rundir import read_metrics
from flopwise.session import start_new
from flopwise.train.display import ProgressDisplay

HERE = Path(__file__).parent
QUIET = ["train.eval_every=0", "train.checkpoint_every=0", "train.forecast_every=0"]


def arms(weight_decay: float) -> dict[str, list[str]]:
    decay = [f"optim.muon_weight_decay={weight_decay:g}"]
    cautious = [*decay, "optim.cautious_weight_decay=true"]
    return {"muon (today)": [], "+ polar express": ["optim.ns_coefficients=polar_express"],
            "+ bf16 iteration": ["optim.ns_precision=bf16"], "+ normuon": ["optim.name=normuon"],
            f"+ muon weight decay {weight_decay:g}": decay, "+ cautious weight decay": cautious,
            "normuon + polar express + cautious wd": ["optim.name=normuon", "optim.ns_coefficients=polar_express",
                                                      *cautious]}


# ---------------------------------------------------------------------------------------------
# 1. Held-out loss of real runs


def train_run(arm: str, settings: list[str], seed: int, steps: int, overrides: list[str], work: Path) -> dict:
    out = work / f"{arm.replace(' ', '_').replace('+', 'p')}-seed{seed}"
    if not (out / "final").is_dir():
        sets = [*overrides, *QUIET, f"train.seed={seed}", *settings]
        command = [sys.executable, "-m", "flopwise", "train", "--budget", f"{steps}steps", "--out", str(out),
                   "--overwrite", *[flag for value in sets for flag in ("--set", value)]]
        with open(work / f"{out.name}.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    events = read_metrics(out / "metrics.jsonl")
    final = [e for e in events if e["event"] == "eval"][-1]
    return {"arm": arm, "seed": seed, "steps": steps, "settings": settings, "val_loss": final["val_loss"],
            "train_loss_last": [e for e in events if e["event"] == "train"][-1]["loss"]}


# ---------------------------------------------------------------------------------------------
# 2. Step time, arms alternating


class TorchMuon:
    """torch.optim.Muon (since torch 2.9) for the blocks' matrices, with flopwise's AdamW groups for the rest:
    the same split and settings as flopwise's Muon, so only the Muon half differs."""

    def __init__(self, model: torch.nn.Module, overrides: list[str]) -> None:
        optim = load_config(None, overrides).optim
        built = build_optimizer(model, optim, torch.device("cpu"))
        hidden = [p for n, p in model.named_parameters() if is_hidden_matrix(n, p.ndim)]
        self.muon = torch.optim.Muon(hidden, lr=optim.muon_lr, weight_decay=optim.muon_weight_decay,
                                     momentum=optim.muon_momentum, nesterov=True, adjust_lr_fn="original")
        self.muon.param_groups[0]["peak_lr"] = optim.muon_lr
        self.adamw = FlopwiseOptimizer([{k: v for k, v in g.items()} for g in built.param_groups
                                        if g["update"] == "adamw"], betas=(optim.beta1, optim.beta2), eps=optim.eps)
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)


def _model_and_batch(overrides: list[str], vocab: int, seed: int = 0) -> tuple[GPT, torch.Tensor]:
    config = load_config(None, overrides)
    torch.manual_seed(seed)
    model = GPT(config.model.build(vocab))
    tokens = torch.randint(0, vocab, (config.optim.batch_size, model.config.seq_len + 1),
                           generator=torch.Generator().manual_seed(seed))
    return model, tokens


def step_times(overrides: list[str], arm_settings: dict[str, list[str]], vocab: int, steps: int,
               repeats: int) -> list[dict[str, Any]]:
    """ms per optimizer step of each arm over ``repeats`` repeats of ``steps`` steps each, arms alternating, with
    forward + backward timed as one more arm.  Ratios are of the medians and of the minima: on a shared machine
    the least disturbed repeat (the minimum) is the steadier estimate of what a step costs."""
    model, tokens = _model_and_batch(overrides, vocab)
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()

    def with_gradients() -> GPT:
        """A copy of the model with its own weights and the same gradients (deepcopy leaves gradients out)."""
        copied = copy.deepcopy(model)
        for param, copy_param in zip(model.parameters(), copied.parameters()):
            copy_param.grad = param.grad.clone()
        return copied

    runners: dict[str, Callable[[], None]] = {}
    for name, settings in arm_settings.items():
        optim = load_config(None, [*overrides, *settings]).optim
        runners[name] = build_optimizer(with_gradients(), optim, torch.device("cpu")).step
    runners["torch.optim.Muon"] = TorchMuon(with_gradients(), overrides).step

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()

    runners["forward + backward"] = forward_backward
    for run in runners.values():  # warm up: states allocated, kernels chosen
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            times[name].append(1000 * (time.perf_counter() - start) / steps)
    forward = times.pop("forward + backward")
    rows = []
    for name, t in times.items():
        row: dict[str, Any] = {"arm": name, "optimizer_ms_all": t, "forward_backward_ms_all": forward}
        for stat, of in (("median", statistics.median), ("min", min)):
            base, forward_ms, ms = of(times["muon (today)"]), of(forward), of(t)
            row.update({f"optimizer_ms_{stat}": ms, f"optimizer_ratio_{stat}": ms / base,
                        f"forward_backward_ms_{stat}": forward_ms,
                        f"step_ratio_{stat}": (forward_ms + ms) / (forward_ms + base)})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# 3. torch.optim.Muon in a hand loop


def hand_loop_loss(overrides: list[str], make: Callable[[torch.nn.Module], Any], steps: int, seed: int,
                   data_session) -> float:
    """Held-out loss after ``steps`` steps of a minimal loop (random training windows, clipping, the recipe's
    schedule on every group's peak LR), on the held-out split's first 64 windows."""
    config = load_config(None, overrides)
    model, _ = _model_and_batch(overrides, data_session.model_cfg.vocab_size, seed)
    optimizer = make(model)
    schedule, o = config.schedule.build(), config.optim
    corpus = data_session.stage.data.corpus
    train, held_out, window = corpus.train_tokens, np.asarray(corpus.val_tokens), model.config.seq_len + 1
    rng = np.random.default_rng(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * schedule(step / steps)
        offsets = rng.integers(0, len(train) - window, o.batch_size)
        batch = torch.from_numpy(np.stack([train[i:i + window] for i in offsets]).astype(np.int64))
        model(batch[:, :-1], batch[:, 1:])[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    count = min(64, len(held_out) // window)
    windows = torch.from_numpy(held_out[:count * window].reshape(count, window).astype(np.int64))
    with torch.no_grad():
        return float(model(windows[:, :-1], windows[:, 1:])[1])


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="the fixed --budget of every run, in steps")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--muon-weight-decay", type=float, default=0.05,
                        help="optim.muon_weight_decay of the decay arms (lr x decay = 2.5e-3 per step at the peak)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config for every arm (default: the default recipe)")
    parser.add_argument("--time-steps", type=int, default=1, help="optimizer steps per timed repeat")
    parser.add_argument("--time-repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing (0: torch's default)")
    parser.add_argument("--skip", choices=["runs", "timing", "torch"], action="append", default=[])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flopwise-optimizer-bench")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "optimizer.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.update({"steps": args.steps, "overrides": args.overrides, "muon_weight_decay": args.muon_weight_decay,
                    "torch": torch.__version__})
    console = Console(width=160)
    settings = arms(args.muon_weight_decay)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    if "runs" not in args.skip:
        runs = [r for r in results.get("runs", []) if r["steps"] == args.steps]
        for seed in range(args.seeds):
            for arm, arm_settings in settings.items():
                if not any(r["arm"] == arm and r["seed"] == seed for r in runs):
                    runs.append(train_run(arm, arm_settings, seed, args.steps, args.overrides, args.work))
                    results["runs"] = runs
                    save()
        _loss_table(console, runs, list(settings), args)

    if {"timing", "torch"} - set(args.skip):
        data = start_new(load_config(None, ["budget.steps=1", *args.overrides]),
                         Path(tempfile.mkdtemp(dir=args.work)) / "data",
                         ProgressDisplay(Console(quiet=True), live=False))  # the tokenized data, from the cache
    if "timing" not in args.skip:
        if args.threads:
            torch.set_num_threads(args.threads)
        results["timing_threads"] = torch.get_num_threads()
        results["step_times"] = step_times(args.overrides, settings, data.model_cfg.vocab_size, args.time_steps,
                                           args.time_repeats)
        save()
        first = results["step_times"][0]
        table = Table(title=f"optimizer step, arms alternating ({args.time_repeats} x {args.time_steps} steps, "
                            f"{results['timing_threads']} threads; "
                            f"forward + backward {first['forward_backward_ms_min']:.1f} ms min, "
                            f"{first['forward_backward_ms_median']:.1f} median)")
        for column in ("arm", "ms min", "ms median", "vs today's (min)", "(median)", "whole step (min)",
                       "(median)"):
            table.add_column(column, justify="right")
        for row in results["step_times"]:
            table.add_row(row["arm"], f"{row['optimizer_ms_min']:.2f}", f"{row['optimizer_ms_median']:.2f}",
                          f"{row['optimizer_ratio_min']:.2f}x", f"{row['optimizer_ratio_median']:.2f}x",
                          f"{row['step_ratio_min']:.3f}x", f"{row['step_ratio_median']:.3f}x")
        console.print(table)

    if "torch" not in args.skip:
        one_shape = [*args.overrides, "methods.progressive=false"]
        optim = load_config(None, one_shape).optim
        makers = {"flopwise Muon": lambda model: build_optimizer(model, optim, torch.device("cpu")),
                  "torch.optim.Muon": lambda model: TorchMuon(model, one_shape)}
        rows = [{"arm": name, "seed": seed, "val_loss": hand_loop_loss(one_shape, make, args.steps, seed, data)}
                for seed in range(args.seeds) for name, make in makers.items()]
        results["torch_muon"] = rows
        save()
        table = Table(title=f"hand loop, {args.steps} steps, one shape: held-out loss (first 64 windows)")
        for column in ("optimizer", *[f"seed {s}" for s in range(args.seeds)], "mean"):
            table.add_column(column, justify="right")
        for name in makers:
            losses = [r["val_loss"] for r in rows if r["arm"] == name]
            table.add_row(name, *[f"{v:.4f}" for v in losses], f"{statistics.mean(losses):.4f}")
        console.print(table)
    console.print(f"written: {args.out}", highlight=False)


def _loss_table(console: Console, runs: list[dict], order: list[str], args: argparse.Namespace) -> None:
    table = Table(title=f"final held-out loss, --budget {args.steps}steps, default recipe {' '.join(args.overrides)}")
    for column in ("arm", *[f"seed {s}" for s in range(args.seeds)], "mean", "vs today's Muon"):
        table.add_column(column, justify="right")
    base = statistics.mean(r["val_loss"] for r in runs if r["arm"] == order[0])
    for arm in order:
        losses = [next(r["val_loss"] for r in runs if r["arm"] == arm and r["seed"] == s) for s in range(args.seeds)]
        mean = statistics.mean(losses)
        table.add_row(arm, *[f"{v:.4f}" for v in losses], f"{mean:.4f}", f"{mean - base:+.4f}")
    console.print(table)


if __name__ == "__main__":
    main()
