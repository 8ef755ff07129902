"""Width pruning (methods.use prune_width, flopwise/methods/width.py): does Minitron's activation importance choose
better heads and channels than chance, and does a pruned start beat training the small shape from scratch?

1. A "big" run trains on a text folder (``--budget Nsteps``: load-independent).
2. One-shot: its model is pruned to the small shape by importance (calibration windows of the text), by chance
   (seeded draws) and by the least important ones; each pruned model's mean loss on 32 other windows of the text
   (which the big run trained on: the arms are compared with each other), no retraining, beside the big model's.
3. Retrained: ``flopwise train --init-from BIG/final --method prune_width`` against the same small shape from random
   weights (flopwise's initialization, saved as a folder to start from), each for the same ``--budget Nsteps`` (the
   pruned run's FLOPs include its calibration forward).

    python bench/width.py                      # small model, 300 big steps, 100 retraining steps
    python bench/width.py --big-steps 150 --steps 50

Prints the tables and writes JSON (bench/results/width.json by default).
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from flopwise.data.tokenizer import byte_tokenizer
from flopwise.methods.width import WidthPruningConfig, importance, pruned_shape, slice_into
from flopwise.model.gpt import GPT
from flopwise.model.hf import load_weights_into, model_config_from_hf, read_hf_config, save_hf_folder
from flopwise.rundir import read_metrics

HERE = Path(__file__).parent
COMMON = ["model.seq_len=128", "optim.batch_size=8", "train.eval_tokens=8192", "train.forecast_every=0",
          "methods.progressive=false"]


def text_folder(root: Path) -> Path:
    """Python's help topics as 40 text files (the tests' corpus): a stand-in any machine has."""
    folder = root / "texts"
    folder.mkdir()
    topics = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    for index in range(40):
        (folder / f"doc{index:02d}.txt").write_text("\n\n".join(topics[index::40])[:5000], encoding="utf-8")
    return folder


def flopwise_train(out: Path, steps: int, texts: Path, *args: str) -> dict:
    sets = [flag for value in COMMON for flag in ("--set", value)]
    command = [sys.executable, "-m", "flopwise", "train", "--data", str(texts), "--budget", f"{steps}steps",
               "--out", str(out), *sets, *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    events = read_metrics(out / "metrics.jsonl")
    final = [e for e in events if e["event"] == "eval"][-1]
    return {"val_loss": final["val_loss"], "flops": final["flops"]}


@torch.no_grad()
def mean_loss(model: GPT, windows: torch.Tensor) -> float:
    return float(model(windows[:, :-1], windows[:, 1:])[1])


def pruned(big: GPT, config: WidthPruningConfig, heads: list[torch.Tensor], channels: list[torch.Tensor]) -> GPT:
    small = GPT(pruned_shape(config, big.config)).eval()
    slice_into(big, small, heads, channels)
    return small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--big-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--heads", type=float, default=0.5)
    parser.add_argument("--mlp", type=float, default=0.5)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "width.json")
    args = parser.parse_args()
    config = WidthPruningConfig(heads=args.heads, mlp=args.mlp, calibration=args.calibration)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = text_folder(root)
        big_result = flopwise_train(root / "big", args.big_steps, texts, "--tokenizer", "byte",
                                    "--set", f"model.size={args.size}")
        folder = root / "big" / "final"
        big = GPT(model_config_from_hf(read_hf_config(folder), folder, 128))
        load_weights_into(big, folder)
        big.eval()
        seq = big.config.seq_len
        tokenizer = byte_tokenizer()
        tokens = torch.tensor([t for path in sorted(texts.glob("*.txt"))
                               for t in tokenizer.encode_batch([path.read_text(encoding="utf-8")])[0]])
        generator = torch.Generator().manual_seed(0)
        starts = torch.randint(0, len(tokens) - seq - 1, (args.calibration + 32,), generator=generator)
        windows = torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()])
        calibration, held_out = windows[:args.calibration, :-1], windows[args.calibration:]
        heads, channels = importance(big, calibration, 8)
        arms = {"big (unpruned)": big,
                "importance (Minitron)": pruned(big, config, heads, channels),
                "least important": pruned(big, config, [-h for h in heads], [-c for c in channels])}
        for seed in (0, 1):
            draw = torch.Generator().manual_seed(seed)
            arms[f"chance (seed {seed})"] = pruned(big, config, [torch.rand(h.shape, generator=draw) for h in heads],
                                                   [torch.rand(c.shape, generator=draw) for c in channels])
        one_shot = {name: mean_loss(model, held_out) for name, model in arms.items()}
        # the small shape from random weights: flopwise's own initialization, saved as a folder to start from (the
        # model section cannot set head_size, which a pruned shape may need)
        torch.manual_seed(0)
        save_hf_folder(GPT(arms["importance (Minitron)"].config), tokenizer, root / "random_small")
        prune_sets = [f"methods.prune_width.heads={args.heads}", f"methods.prune_width.mlp={args.mlp}",
                      f"methods.prune_width.calibration={args.calibration}"]
        retrained = {
            "pruned, retrained": flopwise_train(root / "pruned", args.steps, texts, "--init-from",
                                                str(root / "big" / "final"), "--method", "prune_width",
                                                *[f for s in prune_sets for f in ("--set", s)]),
            "small from scratch": flopwise_train(root / "scratch", args.steps, texts, "--init-from",
                                                 str(root / "random_small")),
        }
    console = Console()
    table = Table(title=f"one-shot pruning of a {args.size} model ({args.big_steps} steps) to heads {args.heads}, "
                        f"mlp {args.mlp}: held-out loss, no retraining")
    table.add_column("arm")
    table.add_column("loss", justify="right")
    for name, loss in one_shot.items():
        table.add_row(name, f"{loss:.4f}")
    console.print(table)
    table = Table(title=f"{args.steps} steps of the small shape: final held-out loss")
    for column in ("start", "val_loss", "FLOPs"):
        table.add_column(column, justify="right" if column != "start" else "left")
    for name, result in retrained.items():
        table.add_row(name, f"{result['val_loss']:.4f}", f"{result['flops']:.3g}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "big": big_result,
                                    "one_shot": one_shot, "retrained": retrained}, indent=2) + "\n")


if __name__ == "__main__":
    main()
