"""``flopwise export``: a run's model as a folder that Hugging Face transformers loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from flopwise.cli.flags import add_checkpoint_flag


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("export", help="save a run's model as a Hugging Face transformers folder",
                            description="Write a run's model as a folder that transformers loads with "
                                        "AutoModelForCausalLM and AutoTokenizer: LlamaForCausalLM (or "
                                        "Qwen3ForCausalLM with QK-norm) for a LLaMA-style model; any other model "
                                        "(e.g. the baseline recipe's GPT-2 pieces) with flopwise's own modeling "
                                        "code beside its weights, loaded with trust_remote_code=True. Safetensors, "
                                        "tokenizer and generation config; README.md says which kind. (A finished "
                                        "run's final/ folder already is one.)",
                            epilog="example:\n  flopwise export runs/a --to hf/my-model\n  python -c \"from "
                                   "transformers import AutoModelForCausalLM as M; M.from_pretrained('hf/my-model')\"",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--to", type=Path, required=True, metavar="FOLDER", help="new (or empty) folder to write")
    add_checkpoint_flag(p)


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from flopwise.evaluate.export import export_run

    kind = export_run(args.run, args.to, args.checkpoint)
    console.print(f"written: {args.to}: {kind.describe()}", highlight=False)
    return 0
