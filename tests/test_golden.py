"""Golden loss curves: every training ``loss`` of 40-step runs, recorded by the code before the method-protocol
refactor, must be reproduced exactly.

Exactly is per kind of CPU: torch and MKL pick their kernels by vector width (torch's cpu capability, AVX2 or
AVX512), and each width sums in its own order, so a curve differs from the other width's by 1e-7 at the first
steps and, through 8-bit rounding that flips, by up to 8% after 40.  MKL also picks by vendor: on an AVX-512 AMD
CPU its matmuls take another path than on an Intel one, so that kind has a key of its own (``AVX512-AuthenticAMD``).
Each file holds one curve per kind, each recorded by code whose curves the ones before it had matched.

An AVX2 machine's curves can be recorded on an AVX-512 one by capping every library at AVX2 (this reproduced the
four curves recorded on an AVX2-only machine exactly):
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``.  An intentional change
regenerates the running machine's with ``FLOPWISE_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden.py`` in a
commit that says why."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from flopwise.cli import main
from flopwise.data.tokenizer import byte_tokenizer
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.model.hf import save_hf_folder
from flopwise.rundir import read_metrics

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("FLOPWISE_REGENERATE_GOLDEN") == "1"


def kernel_kind() -> str:
    """The kernels' vector width (torch's cpu capability), which fixes their summation order, with the CPU's
    vendor where MKL takes a vendor's own path at that width (AVX-512 on AMD)."""
    capability = torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo")
    vendors = [line.split(":", 1)[1].strip() for line in
               (cpuinfo.read_text(encoding="utf-8").splitlines() if cpuinfo.is_file() else [])
               if line.startswith("vendor_id")]
    vendor = vendors[0] if vendors else "GenuineIntel"
    return f"{capability}-{vendor}" if capability == "AVX512" and vendor != "GenuineIntel" else capability


CPU = kernel_kind()
LOOP = ["--budget", "40steps", "--set", "model.seq_len=32", "--set", "optim.batch_size=4",
        "--set", "train.eval_tokens=1024", "--set", "train.log_every=1", "--set", "train.eval_every=0.5",
        "--set", "methods.progressive=false"]  # the curves recorded before progressive training joined the default
SCRATCH = ["--tokenizer", "byte", "--set", "model.size=tiny"]  # an --init-from model brings both

WORDS = ("the model reads every token of a budget and learns to predict the next one while the rate decays "
         "slowly toward zero at the end of training so that each run finishes annealed").split()
SYMBOLS = ("def", "return", "if", "else", "for", "in", "x", "y", "value", "items", "(", ")", ":", "=", "+", "1")


def write_corpus(folder: Path, vocabulary: tuple[str, ...], seed: int, documents: int = 24) -> Path:
    """A fixed synthetic corpus: seeded word sequences (independent of the Python version's files)."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for index in range(documents):
        lines = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(6, 14))) for _ in range(30)]
        (folder / f"doc{index:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("golden")
    return {"prose": write_corpus(root / "prose", tuple(WORDS), seed=1),
            "code": write_corpus(root / "code", SYMBOLS, seed=2),
            "root": root}


def tiny_hf_model(folder: Path) -> Path:
    """A small random Llama-style model saved as a Hugging Face folder, for --init-from (LoRA)."""
    torch.manual_seed(3)
    model = GPT(ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, seq_len=32))
    save_hf_folder(model, byte_tokenizer(), folder)
    return folder


def teacher_run(corpus: dict[str, Path]) -> Path:
    """A small finished run on the same data, for SALT's teacher."""
    run = corpus["root"] / "teacher"
    if not run.is_dir():
        assert main(["train", "--data", str(corpus["prose"]), *LOOP, *SCRATCH, "--set", "model.d_model=32",
                     "--out", str(run)]) == 0
    return run


def write_chats(path: Path, seed: int, records: int = 60) -> Path:
    """Seeded synthetic conversations (sft) or preference pairs (dpo) as JSONL."""
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))
    rows = []
    for _ in range(records):
        if path.stem == "pairs":
            rows.append({"prompt": words(3, 6), "chosen": words(3, 8), "rejected": words(3, 8)})
        else:
            rows.append({"messages": [{"role": "user", "content": words(3, 6)},
                                      {"role": "assistant", "content": words(3, 8)}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sft_run(corpus: dict[str, Path]) -> Path:
    """The SFT case's run, the starting model of the DPO case."""
    run = corpus["root"] / "sft"
    if not run.is_dir():
        assert main(case_args("sft", corpus, corpus["root"]) + ["--out", str(run)]) == 0
    return run


# The first argument names the command when it is not `train`.
CASES: dict[str, list[str]] = {
    "default": [],
    "progressive": ["--set", "methods.progressive=true"],
    "qat": ["--method", "qat"],
    "z-loss": ["--method", "z_loss"],
    "bf16-weights": ["--method", "bf16_weights"],
    "sft": ["sft", "CHATS"],
    "dpo": ["dpo", "PAIRS"],
    "baseline": ["--recipe", "baseline"],
    "memory-8bit": ["--method", "8bit"],
    "memory-8bit-checkpointing": ["--method", "8bit", "--method", "checkpointing"],
    "memory-galore-8bit-checkpointing-layerwise": ["--method", "galore", "--method", "8bit", "--method",
                                                   "checkpointing", "--method", "layerwise", "--set",
                                                   "optim.name=adamw", "--set", "methods.galore.update_gap=10",
                                                   "--set", "methods.galore.rank=8"],
    "memory-sltrain-8bit-checkpointing": ["--method", "sltrain", "--method", "8bit", "--method", "checkpointing",
                                          "--set", "methods.sltrain.refactor_every=10",
                                          "--set", "methods.sltrain.rewarmup=3"],
    "lisa": ["--method", "lisa", "--set", "methods.lisa.layers=1", "--set", "methods.lisa.interval=5"],
    "lora": ["--method", "lora", "INIT_FROM"],
    "static-mixture": ["MIXTURE"],
    "online-mixture-loss": ["MIXTURE_NATURAL", "--online-mixture", "loss"],
    "reweight": ["--reweight"],
    "curriculum-rarity": ["--curriculum", "rarity"],
    "teacher": ["--teacher", "TEACHER", "--set", "methods.salt.select_pool=2"],
}


def case_args(name: str, corpus: dict[str, Path], tmp_path: Path) -> list[str]:
    """The command line of one case, with its placeholders made real."""
    command, *rest = CASES[name] if CASES[name][:1] in (["sft"], ["dpo"]) else ["train", *CASES[name]]
    if command != "train":  # post-training: its own data, from a finished run (which brings the tokenizer)
        data = write_chats(tmp_path / ("pairs.jsonl" if command == "dpo" else "chats.jsonl"), seed=4)
        start = sft_run(corpus) if command == "dpo" else teacher_run(corpus)
        return [command, "--data", str(data), "--init-from", str(start), *LOOP, "--set", "model.seq_len=128"]
    args: list[str] = []
    data = ["--data", str(corpus["prose"])]
    for arg in rest:
        if arg == "INIT_FROM":
            args += ["--init-from", str(tiny_hf_model(tmp_path / "hf"))]
        elif arg == "MIXTURE":
            data = ["--data", f"prose={corpus['prose']}:0.7", "--data", f"code={corpus['code']}:0.3"]
        elif arg == "MIXTURE_NATURAL":
            data = ["--data", f"prose={corpus['prose']}", "--data", f"code={corpus['code']}"]
        elif arg == "TEACHER":
            args.append(str(teacher_run(corpus)))
        else:
            args.append(arg)
    scratch = [] if "INIT_FROM" in CASES[name] else SCRATCH
    return [command, *data, *LOOP, *scratch, *args]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_loss_curve_matches_its_golden_file(name, corpus, tmp_path):
    run = tmp_path / "run"
    assert main([*case_args(name, corpus, tmp_path), "--out", str(run)]) == 0
    curve = [event["loss"] for event in read_metrics(run / "metrics.jsonl") if event["event"] == "train"]
    assert len(curve) == 40
    golden = GOLDEN / f"{name}.json"
    recorded = json.loads(golden.read_text(encoding="utf-8")) if golden.is_file() else {"loss": {}}
    if REGENERATE:
        recorded = {"args": CASES[name], "loss": dict(recorded["loss"], **{CPU: curve})}
        golden.write_text(json.dumps(recorded, indent=1) + "\n", encoding="utf-8")
    if CPU not in recorded["loss"]:
        pytest.skip(f"no golden curve recorded on a {CPU} CPU (only {', '.join(recorded['loss'])}): record one "
                    "with the pre-change code and FLOPWISE_REGENERATE_GOLDEN=1")
    assert recorded["loss"][CPU] == curve
