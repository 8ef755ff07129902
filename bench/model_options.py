"""The speedrun model options (docs/model.md), each alone against none: the held-out loss after a fixed number
of steps on the built-in corpus, and the cost of a training step.

Loss: one real run per arm and seed (``flopwise train --budget Nsteps``, one shape for the whole run: no
progressive methods), arms in sequence within each seed; a step budget makes the loss independent of how busy
the machine is.  Step cost: the arms' models and optimizers built side by side in this process, their training
steps (forward, backward, optimizer) timed in rounds that alternate the arms, each arm's median step time
divided by that of the model without options, so load that changes during the bench hits every arm alike.

    python bench/model_options.py                                   # small, 300 steps, seeds 0 and 1
    python bench/model_options.py --size tiny --steps 200 --seeds 0  # a quick look on a busy CPU

Prints the table and writes JSON (bench/results/model_options.json by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from flopwise.config import load_config
from flopwise.methods.mtp import mtp_loss, mtp_weights
from flopwise.model.flops import count_parameters, flops_per_token
from flopwise.model.gpt import GPT
from flopwise.optim.build import build_optimizer

HERE = Path(__file__).parent
BUILTIN_BPE_VOCAB = 4096  # data.vocab_size's default: the built-in corpus's tokenizer
# arm -> its --set values; the bigram table has the record's 5 x vocabulary rows, the softcap nanochat's 15
ARMS = {
    "none": [],
    "value_embeds": ["model.value_embeds=true"],
    "x0_lambdas": ["model.x0_lambdas=true"],
    "unet_skips": ["model.unet_skips=true"],
    "smear": ["model.smear=true"],
    "logit_softcap": ["model.logit_softcap=15"],
    "bigram_hash": [f"model.bigram_hash={5 * BUILTIN_BPE_VOCAB}"],
    "mtp": ["model.mtp_tokens=2"],
}
ARMS["all"] = [value for sets in ARMS.values() for value in sets]


def run_loss(work: Path, arm: str, seed: int, common: list[str], steps: int) -> float:
    """The final held-out loss of one run."""
    out = work / f"{arm}-{seed}"
    sets = [*common, *ARMS[arm]]
    command = [sys.executable, "-m", "flopwise", "train", "--budget", f"{steps}steps", "--seed", str(seed),
               "--out", str(out), *[flag for s in sets for flag in ("--set", s)]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{arm} (seed {seed}) failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "eval"][-1]["val_loss"]


def step_ratios(common: list[str], rounds: int) -> dict[str, float]:
    """Each arm's median training-step time over the model without options', steps alternating between arms."""
    config = load_config(None, common)
    batch = config.optim.batch_size
    arms = {}
    for arm, sets in ARMS.items():
        cfg = load_config(None, [*common, *sets]).model.build(BUILTIN_BPE_VOCAB)
        torch.manual_seed(0)
        model = GPT(cfg)
        arms[arm] = (model, build_optimizer(model, config.optim, torch.device("cpu")))
    tokens = torch.randint(0, BUILTIN_BPE_VOCAB, (batch, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for round_ in range(rounds + 1):
        for arm, (model, optimizer) in arms.items():
            start = time.perf_counter()
            if model.config.mtp_tokens:  # the step as the mtp method makes it, at its start (most extra targets)
                logits, token_losses = model(x, y, reduction="none")
                weights = mtp_weights(model.config.mtp_tokens, model.config.mtp_weight, 0.0)
                loss = (token_losses.mean(dim=1) + mtp_loss(logits, y, weights)).mean()
            else:
                _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_:  # the first round warms up
                times[arm].append(time.perf_counter() - start)
    base = statistics.median(times["none"])
    return {arm: statistics.median(t) / base for arm, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per arm")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "model_options.json")
    args = parser.parse_args()
    common = [f"model.size={args.size}", "methods.progressive=false", "train.eval_every=0",
              "train.checkpoint_every=0", "train.eval_tokens=65536"]
    ratios = step_ratios(common, args.rounds)
    print(json.dumps({"step_time_ratio": ratios}), flush=True)
    losses: dict[str, list[float]] = {arm: [] for arm in args.arms}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for arm in args.arms:
                losses[arm].append(run_loss(Path(work), arm, seed, common, args.steps))
                print(json.dumps({"arm": arm, "seed": seed, "val_loss": losses[arm][-1]}), flush=True)
    base_cfg = load_config(None, common).model.build(BUILTIN_BPE_VOCAB)
    table = Table(title=f"model options, {args.size}, {args.steps} steps, seeds {args.seeds} (built-in corpus)")
    for column in ("arm", "held-out loss", "vs none", "step time / none's", "FLOPs/token / none's",
                   "parameters / none's"):
        table.add_column(column)
    base_loss = statistics.mean(losses["none"]) if "none" in losses else None
    summary = []
    for arm in args.arms:
        cfg = load_config(None, [*common, *ARMS[arm]]).model.build(BUILTIN_BPE_VOCAB)
        mean = statistics.mean(losses[arm])
        row = {"arm": arm, "val_loss": mean, "val_losses": losses[arm],
               "delta": None if base_loss is None else mean - base_loss, "step_time_ratio": ratios[arm],
               "flops_ratio": flops_per_token(cfg) / flops_per_token(base_cfg),
               "params_ratio": count_parameters(cfg)["total"] / count_parameters(base_cfg)["total"]}
        summary.append(row)
        table.add_row(arm, f"{mean:.4f}", "" if row["delta"] is None else f"{row['delta']:+.4f}",
                      f"{row['step_time_ratio']:.3f}", f"{row['flops_ratio']:.4f}", f"{row['params_ratio']:.3f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "steps": args.steps, "seeds": args.seeds,
                                    "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
