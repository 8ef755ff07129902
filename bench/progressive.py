"""Screening progressive training's settings (depth growth, sequence-length and batch schedules) at one
seconds budget: each variant trains with the bench's run settings (flopwise/benchmark.py) on the default
recipe plus its overrides (the harness is bench/screen.py).

    python bench/progressive.py --seconds 60 --seeds 0 1 --out bench/results/progressive_screen.json
"""

from __future__ import annotations

from pathlib import Path

from screen import main

HERE = Path(__file__).parent
GROW, SEQ, BATCH = "methods.use=[\"grow_depth\"]", "methods.use=[\"seq_schedule\"]", "methods.use=[\"batch_schedule\"]"
VARIANTS: dict[str, list[str]] = {
    "default": ["methods.progressive=false"],  # the recipe before progressive training
    "grow g2 at 0.25": [GROW, "methods.grow_depth.at=0.25"],
    "grow g2 at 0.5": [GROW, "methods.grow_depth.at=0.5"],
    "grow g4 at 0.25": [GROW, "methods.grow_depth.factor=4", "methods.grow_depth.at=0.25"],
    "seq 1/4 until 0.5": [SEQ, "methods.seq_schedule.start=0.25", "methods.seq_schedule.until=0.5"],
    "seq 1/4 until 0.25": [SEQ, "methods.seq_schedule.start=0.25", "methods.seq_schedule.until=0.25"],
    "seq 1/8 until 0.5": [SEQ, "methods.seq_schedule.start=0.125", "methods.seq_schedule.until=0.5"],
    "batch 1/4 until 0.5 sqrt": [BATCH, "methods.batch_schedule.start=0.25", "methods.batch_schedule.until=0.5"],
    "batch 1/4 until 0.5 none": [BATCH, "methods.batch_schedule.start=0.25", "methods.batch_schedule.until=0.5",
                                 "methods.batch_schedule.lr_scaling=none"],
    "batch 1/2 until 0.25 sqrt": [BATCH, "methods.batch_schedule.start=0.5", "methods.batch_schedule.until=0.25"],
    "grow g2 at 0.75": [GROW, "methods.grow_depth.at=0.75"],
    "seq 1/8 until 0.75": [SEQ, "methods.seq_schedule.start=0.125", "methods.seq_schedule.until=0.75"],
    "seq 1/16 until 0.5": [SEQ, "methods.seq_schedule.start=0.0625", "methods.seq_schedule.until=0.5"],
    "grow g2 at 0.5 + seq 1/8 until 0.5": [
        'methods.use=["grow_depth","seq_schedule"]', "methods.grow_depth.at=0.5",
        "methods.seq_schedule.start=0.125", "methods.seq_schedule.until=0.5"],
    "grow g2 at 0.75 + seq 1/16 until 0.5": [
        'methods.use=["grow_depth","seq_schedule"]', "methods.grow_depth.at=0.75",
        "methods.seq_schedule.start=0.0625", "methods.seq_schedule.until=0.5"],
    "grow g2 at 0.75 + seq 1/8 until 0.5": [
        'methods.use=["grow_depth","seq_schedule"]', "methods.grow_depth.at=0.75",
        "methods.seq_schedule.start=0.125", "methods.seq_schedule.until=0.5"],
    "grow g2 at 0.5 + seq 1/8 until 0.5 + batch 1/2 until 0.25": [
        'methods.use=["grow_depth","seq_schedule","batch_schedule"]', "methods.grow_depth.at=0.5",
        "methods.seq_schedule.start=0.125", "methods.seq_schedule.until=0.5",
        "methods.batch_schedule.start=0.5", "methods.batch_schedule.until=0.25"],
}


if __name__ == "__main__":
    main(VARIANTS, __doc__, HERE / "results" / "progressive_screen.json", "progressive settings")
