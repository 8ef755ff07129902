"""Document-aware windows, attention within documents and weight averaging against the default recipe, at a
fixed number of steps (load-independent): which buy held-out loss, and what each costs per step?

Arms, each a full run of the default recipe (progressive methods included) on the built-in corpus:

- stream: the default, windows at a fixed stride of the token stream, causal attention across documents;
- doc_start: ``data.windows=doc_start``, windows that begin at a document (flopwise/data/sampler.py);
- doc_mask: ``data.doc_mask=true``, attention within each document of a window;
- doc_start+mask: both;
- ema / ema_short / uniform: ``methods.weight_average`` over the decay (an EMA with a half-life of 0.05 or 0.01
  of the budget, or the plain mean), on the stream's training, which they do not change (so their differences
  from stream are paired, free of the data order's noise).

Each final model is scored twice on the same held-out windows: as every run is (causal across the documents of a
window, the number in metrics.jsonl, checked here against a re-evaluation) and with attention kept within each
document (the evaluation a doc_mask model trained for).  Then the per-step cost, timed in this one process with
the arms alternating on the same batches (so the machine's load hits both): a step with the document mask against
the causal step (one thread, the process's own CPU time), a weight-average update against a step, and the
share of batches that hold a document boundary (only those take the mask).  Finished runs are kept, so a rerun
only adds what is missing.  Prints the tables and writes bench/results/docwin_averaging.json.

    python bench/docwin_averaging.py --steps 100 --model tiny --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from flopwise.config import load_config, load_run_config
from flopwise.data.pipeline import prepare_data
from flopwise.data.sampler import PackedSampler, document_segments
from flopwise.data.tokenizer import Tokenizer
from flopwise.evaluate.heldout import FINAL_EVAL_SCALE, heldout_windows
from flopwise.evaluate.load import load_final_model
from flopwise.methods.base import StepShape
from flopwise.methods.stack import MethodStack
from flopwise.methods.weight_average import WeightAverage
from flopwise.model.gpt import GPT
from flopwise.optim.build import build_optimizer

HERE = Path(__file__).parent
WORK = Path(os.environ.get("FLOPWISE_BENCH_WORK", "/tmp/flopwise-docwin-bench"))
ARMS: dict[str, list[str]] = {
    "stream": [],
    "doc_start": ["--set", "data.windows=doc_start"],
    "doc_mask": ["--set", "data.doc_mask=true"],
    "doc_start+mask": ["--set", "data.windows=doc_start", "--set", "data.doc_mask=true"],
    "ema": ["--method", "weight_average"],
    "uniform": ["--method", "weight_average", "--set", "methods.weight_average.kind=uniform"],
    "ema_short": ["--method", "weight_average", "--set", "methods.weight_average.half_life=0.01"],
}


def train(out: Path, steps: int, seed: int, model: str, eval_tokens: int, data: str, extra: list[str]
          ) -> dict[str, Any]:
    """One run through the CLI (unless finished before); its final held-out loss, both ways."""
    if not (out / "final").is_dir():
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        command = [sys.executable, "-m", "flopwise", "train", "--budget", f"{steps}steps", "--model", model,
                   "--seed", str(seed), "--out", str(out), "--data", data, "--set", "train.forecast_every=0",
                   "--set", "train.eval_every=0", "--set", f"train.eval_tokens={eval_tokens}", *extra]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in events if e["event"] == "eval"][-1]
    last = [e for e in events if e["event"] == "train"][-1]
    causal, masked = heldout_both_ways(out)
    if abs(causal - final["val_loss"]) > 1e-4:
        raise SystemExit(f"{out}: re-evaluated {causal:.6f}, but the run logged {final['val_loss']:.6f}")
    return {"val_loss": final["val_loss"], "val_loss_doc_masked": masked, "domains": final["domains"],
            "train_loss": last["loss"], "tokens": last["tokens"], "run": str(out)}


@torch.no_grad()
def heldout_both_ways(run: Path) -> tuple[float, float]:
    """The final model's held-out loss on the windows of its final evaluation: causal across documents, and
    within each document (segments at each end-of-text token); per domain, then over all tokens, as the
    evaluation sums them."""
    config = load_run_config(run)
    tokenizer = Tokenizer.load(run / "tokenizer.json")
    corpus = prepare_data(config.data, config.train.seed, tokenizer).corpus
    model, _ = load_final_model(run, torch.device("cpu"))
    model.eval()
    sums = {"causal": 0.0, "masked": 0.0}
    tokens = 0
    for domain in corpus.domains:
        windows = torch.from_numpy(heldout_windows(corpus.val_tokens_by_domain(domain), model.config.seq_len,
                                                   config.train.eval_tokens * FINAL_EVAL_SCALE))
        for batch in windows.split(config.optim.batch_size):
            x, y = batch[:, :-1], batch[:, 1:]
            sums["causal"] += model(x, y, reduction="none")[1].double().sum().item()
            segments = document_segments(x, tokenizer.eos_id)
            sums["masked"] += model(x, y, reduction="none", segments=segments)[1].double().sum().item()
            tokens += y.numel()
    return sums["causal"] / tokens, sums["masked"] / tokens


def step_costs(model: str, reps: int) -> dict[str, Any]:
    """CPU seconds of a training step of the default recipe's full shape, on one thread (the process's own time,
    which other processes' load moves less than the wall clock): causal, and with the document mask (what any
    batch holding a document boundary costs), the arms alternating on the same batches; a weight-average
    update against a step; and the share of batches that hold a boundary (the others skip the mask), with
    stream and with doc_start windows.  ``model``: a size, or SIZE:SEQ_LEN."""
    size, _, seq_len = model.partition(":")
    config = load_config(None, [], {"model.size": size, **({"model.seq_len": int(seq_len)} if seq_len else {})})
    prepared = prepare_data(config.data, config.train.seed)
    eos = prepared.tokenizer.eos_id
    torch.manual_seed(0)
    cfg = config.model.build(prepared.tokenizer.vocab_size)
    model = GPT(cfg)
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"))
    stack = MethodStack(config.methods)
    corpus = prepared.corpus
    sampler = PackedSampler(corpus.train_tokens, cfg.seq_len, config.optim.batch_size, seed=0)
    average = WeightAverage(WeightAverage.Config(start=0.0))
    average.configure(model)
    average.reshape(StepShape(config.optim.batch_size, cfg.seq_len, cfg.n_layers), model, optimizer)

    def step(batch: Any) -> float:
        start = time.process_time()
        loss, _ = stack.loss(model, batch, torch.device("cpu"), torch.float32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.process_time() - start

    def update() -> float:
        start = time.process_time()
        average.after_step(0, model, optimizer)
        return time.process_time() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seconds: dict[str, list[float]] = {"causal": [], "masked": [], "average": []}
    for rep in range(reps + 2):  # two warm-up rounds
        batch = sampler.next_batch()
        average.on_progress(rep, 0.5 + rep / (2 * (reps + 2)))
        timed = {"masked": step(batch._replace(segments=document_segments(batch.inputs, eos))),
                 "causal": step(batch), "average": update()}
        if rep >= 2:
            for arm, value in timed.items():
                seconds[arm].append(value)
    torch.set_num_threads(threads)
    ratios = [m / c for m, c in zip(seconds["masked"], seconds["causal"])]
    shares = [a / c for a, c in zip(seconds["average"], seconds["causal"])]
    with_boundary = {}
    for layout, starts in (("stream", None), ("doc_start", corpus.train_docs[:, 0])):
        masked = PackedSampler(corpus.train_tokens, cfg.seq_len, config.optim.batch_size, seed=0, doc_starts=starts,
                               segment_token=eos)
        with_boundary[layout] = statistics.mean(masked.next_batch().segments is not None for _ in range(500))
    return {"model": size, "shape": cfg.to_dict(), "batch": config.optim.batch_size, "reps": reps,
            "seconds": seconds, "mask_over_causal": statistics.median(ratios), "mask_ratios": ratios,
            "average_over_step": statistics.median(shares), "batches_with_a_boundary": with_boundary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--data", default="stdlib", help="the training data (--data of flopwise train)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--timing-models", nargs="*", default=["tiny", "small", "small:1024"],
                        help="shapes to time: a model size, or SIZE:SEQ_LEN")
    parser.add_argument("--timing-reps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "docwin_averaging.json")
    args = parser.parse_args()
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    settings = {"steps": args.steps, "model": args.model, "eval_tokens": args.eval_tokens, "data": args.data}
    if results.get("settings") != settings:
        results = {"settings": settings, "runs": {}}
    console = Console()
    for seed in args.seeds:
        for arm in args.arms:
            key = f"{arm}/s{seed}"
            if key not in results["runs"]:
                folder = WORK / f"{Path(args.data).name}-{args.model}-{args.steps}" / f"{arm}-s{seed}"
                results["runs"][key] = train(folder, args.steps, seed, args.model, args.eval_tokens, args.data,
                                             ARMS[arm])
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
            run = results["runs"][key]
            console.print(f"{key}: {run['val_loss']:.4f} (doc-masked eval {run['val_loss_doc_masked']:.4f})",
                          highlight=False)
    results["timing"] = [step_costs(size, args.timing_reps) for size in args.timing_models]
    report(results, console)
    args.out.write_text(json.dumps(results, indent=1))
    console.print(f"written: {args.out}", highlight=False)


def report(results: dict[str, Any], console: Console) -> None:
    runs, s = results["runs"], results["settings"]
    table = Table(title=f"final held-out loss after {s['steps']} steps ({s['model']}, default recipe, data "
                        f"{s['data']}), mean over seeds; change against stream, seed by seed")
    for column in ("arm", "seeds", "held-out loss", "vs stream", "doc-masked eval", "vs stream", "train loss"):
        table.add_column(column, justify="right")
    summary = {}
    for arm in ARMS:
        keys = sorted(k for k in runs if k.startswith(f"{arm}/"))
        if not keys:
            continue
        base = [runs.get(f"stream/{k.split('/')[1]}") for k in keys]
        change = [runs[k]["val_loss"] - b["val_loss"] for k, b in zip(keys, base) if b]
        masked_change = [runs[k]["val_loss_doc_masked"] - b["val_loss_doc_masked"] for k, b in zip(keys, base) if b]
        row = {"val_loss": statistics.mean(runs[k]["val_loss"] for k in keys), "change": change,
               "val_loss_doc_masked": statistics.mean(runs[k]["val_loss_doc_masked"] for k in keys),
               "masked_change": masked_change, "train_loss": statistics.mean(runs[k]["train_loss"] for k in keys)}
        summary[arm] = row
        table.add_row(arm, str(len(keys)), f"{row['val_loss']:.4f}", _changes(change),
                      f"{row['val_loss_doc_masked']:.4f}", _changes(masked_change), f"{row['train_loss']:.4f}")
    console.print(table)
    timing = Table(title="per-step CPU time on one thread, arms alternating in one process (median ratio of the "
                         "repetitions); the share of batches that hold a document boundary and so take the mask")
    for column in ("model", "T", "batch", "mask / causal", "ratios", "EMA update / step",
                   "batches masked (stream)", "(doc_start)"):
        timing.add_column(column, justify="right")
    for t in results["timing"]:
        masked = t["batches_with_a_boundary"]
        timing.add_row(t["model"], str(t["shape"]["seq_len"]), str(t["batch"]), f"{t['mask_over_causal']:.2f}x",
                       " ".join(f"{r:.2f}" for r in t["mask_ratios"]), f"{100 * t['average_over_step']:.1f}%",
                       f"{masked['stream']:.0%}", f"{masked['doc_start']:.0%}")
    console.print(timing)
    results["summary"] = summary


def _changes(changes: list[float]) -> str:
    if not changes:
        return "-"
    return f"{statistics.mean(changes):+.4f} ({', '.join(f'{c:+.4f}' for c in changes)})"


if __name__ == "__main__":
    main()
