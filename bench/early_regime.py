"""What a model learns at the default corpus's early drop, the sudden fall of the held-out loss at
1-4M tokens that a scan's short pilots end in and that bends the law (bench/RESULTS.md#planner).

One run of a family member is trained on a token budget (so the same steps on any machine) with a
checkpoint every 4% of it.  Each checkpoint's per-token held-out loss is then split by what could
predict the token:

- ``copy``: the bigram (previous token, token) already occurred earlier in the same window, so a
  model that looks back for the previous token and copies what followed it (an induction head,
  Olsson et al. 2022) predicts it;
- ``seen``: not ``copy``, but the 8 tokens ending in it occur somewhere in the training split
  (boilerplate, license headers, near-duplicates the near-dedup keeps), so memorization predicts it;
- ``other``: neither.

Two probes of the mechanism go with it: the loss on the second copy of a random token sequence
repeated twice against the first (induction: the second copy is free once induction heads exist),
and the training split's share of 8-grams seen more than once.

    python bench/early_regime.py train --cores 0      # ~10 min on one core of this CPU
    python bench/early_regime.py analyze --cores 0    # table + bench/results/early_regime.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from pinning import pinned

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "early_regime.json"
NGRAM = 8
REPEAT = 32  # the random sequence repeated twice is this long
MAX_HELDOUT = 120_000


def train(args: argparse.Namespace) -> None:
    from flopwise.scaling.shapes import family_fields

    shape = [flag for name, value in family_fields(args.width).items() if value is not None
             for flag in ("--set", f"model.{name}={value}")]
    prefix, env = pinned(args.cores)
    env["FLOPWISE_CACHE"] = str(args.work / "cache")
    subprocess.run([*prefix, sys.executable, "-m", "flopwise", "train", "--budget", args.tokens, *shape,
                    "--set", "train.checkpoint_every=0.04", "--set", "train.keep_checkpoints=30",
                    "--set", "train.eval_every=0.04", "--out", str(args.work / "run")], check=True, env=env)


def ngram_keys(tokens: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """One 64-bit key per n-gram (a polynomial hash; collisions at this corpus size are negligible)."""
    t = tokens.astype(np.uint64)
    keys = np.zeros(len(t) - n + 1, dtype=np.uint64)
    for i in range(n):
        keys = keys * np.uint64(1_000_003) + t[i:len(t) - n + 1 + i]
    return keys


def categories(windows: np.ndarray, seen_keys: np.ndarray) -> np.ndarray:
    """Per target of each window (window[1:]): 0 copy, 1 seen, 2 other.  ``seen_keys`` sorted and unique."""
    out = np.full((len(windows), windows.shape[1] - 1), 2, dtype=np.int64)
    for row, window in enumerate(windows):
        bigrams: set[tuple[int, int]] = set()
        for i in range(1, len(window)):
            pair = (int(window[i - 1]), int(window[i]))
            if pair in bigrams:
                out[row, i - 1] = 0
            bigrams.add(pair)
    if windows.shape[1] >= NGRAM:  # the 8-gram window[j:j+8] ends at target index j + 6
        keys = np.stack([ngram_keys(window) for window in windows])
        at = np.searchsorted(seen_keys, keys).clip(max=len(seen_keys) - 1)
        seen = seen_keys[at] == keys
        tail = out[:, NGRAM - 2:]
        tail[(tail == 2) & seen] = 1
    return out


def analyze(args: argparse.Namespace) -> None:
    import os

    os.environ["FLOPWISE_CACHE"] = str(args.work / "cache")
    import torch
    from safetensors.torch import load_model

    from flopwise.config import load_run_config
    from flopwise.data.pipeline import prepare_data
    from flopwise.data.tokenizer import Tokenizer
    from flopwise.evaluate.heldout import heldout_windows
    from flopwise.methods.dense import build_model, plain_model
    from flopwise.methods.stack import MethodStack
    from flopwise.rundir import planned_model_config, read_metrics
    from flopwise.train.checkpoint import list_checkpoints

    if args.cores:
        torch.set_num_threads(len(args.cores.split(",")))
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    run = args.work / "run"
    config = load_run_config(run)
    tokenizer = Tokenizer.load(run / "tokenizer.json")
    corpus = prepare_data(config.data, config.train.seed, tokenizer).corpus
    train_tokens = np.asarray(corpus.train_tokens)
    keys, counts = np.unique(ngram_keys(train_tokens), return_counts=True)
    repeated_share = float(counts[counts > 1].sum() / counts.sum())
    cfg = planned_model_config(run)
    windows = np.concatenate([heldout_windows(corpus.val_tokens_by_domain(d), cfg.seq_len, None)
                              for d in corpus.domains])[: MAX_HELDOUT // cfg.seq_len]
    kinds = categories(windows, keys)
    rng = np.random.default_rng(0)
    random_seq = rng.integers(256, cfg.vocab_size, size=(64, REPEAT))  # past the byte tokens: real merges
    repeated = torch.from_numpy(np.concatenate([random_seq, random_seq], axis=1))
    logged = next(e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train" and e["step"] > 1)
    tokens_per_step = logged["tokens"] / logged["step"]
    rows = []
    for info in list_checkpoints(run / "checkpoints"):
        model = build_model(cfg, MethodStack(config.methods, config.train.seed).configure)
        load_model(model, str(info.path / "model.safetensors"), strict=True)
        model = plain_model(model).eval()
        with torch.no_grad():
            losses = np.concatenate([model.per_token_loss(torch.from_numpy(chunk[:, :-1]),
                                                          torch.from_numpy(chunk[:, 1:])).float().numpy()
                                     for chunk in np.array_split(windows, max(1, len(windows) // 16))])
            rep = model.per_token_loss(repeated[:, :-1], repeated[:, 1:]).float().numpy()
        row = {"step": info.step, "tokens": info.step * tokens_per_step, "heldout": float(losses.mean()),
               "random_first": float(rep[:, : REPEAT - 1].mean()), "random_second": float(rep[:, REPEAT:].mean())}
        for index, name in enumerate(("copy", "seen", "other")):
            row[name] = float(losses[kinds == index].mean())
        rows.append(row)
        print(f"{row['tokens']:>10,.0f} tokens  held-out {row['heldout']:.3f}  copy {row['copy']:.3f}  seen "
              f"{row['seen']:.3f}  other {row['other']:.3f}  random 1st {row['random_first']:.2f} 2nd "
              f"{row['random_second']:.2f}", flush=True)
    shares = {name: float((kinds == i).mean()) for i, name in enumerate(("copy", "seen", "other"))}
    result = {"run": str(run), "width": cfg.d_model, "shares": shares, "repeated_8gram_share": repeated_share,
              "rows": rows, "drop": induction_drop(rows, shares)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"held-out targets: {shares}; training 8-grams seen more than once: {repeated_share:.1%}")
    print(f"the drop: {json.dumps(result['drop'])}")


def induction_drop(rows: list[dict[str, Any]], shares: dict[str, float], span: int = 4) -> dict[str, Any]:
    """The ``span`` checkpoints over which the repeated random sequence's second copy got cheapest fastest
    (induction heads forming), and how much of the held-out loss's fall there each kind of target made:
    its share of the targets times its own fall."""
    pairs = list(zip(rows[1:], rows[1 + span:]))  # from the second checkpoint: the first is the initialization
    before, after = max(pairs, key=lambda pair: pair[0]["random_second"] - pair[1]["random_second"])
    fall = {k: before[k] - after[k] for k in ("heldout", "copy", "seen", "other", "random_second", "random_first")}
    return {"from_tokens": before["tokens"], "to_tokens": after["tokens"], "fall": fall,
            "heldout_fall_from": {k: shares[k] * fall[k] for k in ("copy", "seen", "other")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("train", "analyze"))
    parser.add_argument("--width", type=int, default=96, help="family width (default 96, the scans' smallest)")
    parser.add_argument("--tokens", default="5M", help="token budget of the run (default 5M: past the drop)")
    parser.add_argument("--cores", help="pin to these cores with one thread each, e.g. 0")
    parser.add_argument("--work", type=Path, default=Path("/tmp/flopwise-early-regime"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    train(args) if args.stage == "train" else analyze(args)


if __name__ == "__main__":
    main()
