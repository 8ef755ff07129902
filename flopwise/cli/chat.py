"""``flopwise chat``: talk to a fine-tuned run in the terminal, replies printed as they are sampled."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from flopwise.cli.flags import add_checkpoint_flag, load_sampling_model, require_utf8
from flopwise.errors import EXIT_INTERRUPTED, FlopwiseError

if TYPE_CHECKING:
    from flopwise.posttrain.chat import ChatSession

PROMPT = "[bold cyan]you>[/bold cyan] "
ANSWER = "assistant> "
EXIT = "/exit"


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "chat", help="talk to a fine-tuned run (multi-turn, streamed)",
        description="Talk to a run fine-tuned with flopwise sft or dpo: each reply is sampled from the whole "
                    "conversation, rendered with the chat template the run trained on (ChatML), and printed as "
                    "it is sampled (KV-cached decoding).  Ctrl-C stops a reply, not the chat (the partial reply "
                    "stays in the conversation); Ctrl-D, /exit or Ctrl-C at the prompt ends the chat (exit 0).  "
                    "A conversation longer than the model's context loses its oldest exchanges first.",
        epilog="examples:\n"
               "  flopwise chat runs/sft                                   # interactive\n"
               "  flopwise chat runs/sft --system 'Answer in one line.' --temperature 0.3\n"
               "  flopwise chat runs/sft --prompt 'What does len() do?'    # one reply, for scripts\n"
               "  flopwise chat runs/sft --temperature 0 --prompt 'Hi'     # greedy: as transformers' generate",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run folder (fine-tuned: its tokenizer has the chat tokens)")
    p.add_argument("--system", default=None, help="system message that opens the conversation")
    p.add_argument("--prompt", default=None,
                   help="one user message: print only the reply and exit (no interactive loop)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9,
                   help="nucleus sampling: the smallest set of tokens with this much probability (default 0.9; "
                        "1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling, for a reproducible conversation")
    add_checkpoint_flag(p)
    p.add_argument("--device", default="auto")


def cmd_chat(args: argparse.Namespace, console: Console) -> int:
    from flopwise.posttrain.chat import ChatSession, Sampling, require_chat_tokens

    for flag in ("--system", "--prompt"):
        value = getattr(args, flag.removeprefix("--"))
        if value is not None:
            require_utf8(value, flag)
    model, tokenizer, top_k = load_sampling_model(args)
    require_chat_tokens(tokenizer, args.run)
    sampling = Sampling(args.temperature, top_k, args.top_p, args.max_tokens, args.seed)
    session = ChatSession(model, tokenizer, sampling, args.system)
    if args.prompt is not None:  # Ctrl-C here cuts the one reply short: the script is told (130)
        return 0 if _answer(session, args.prompt) else EXIT_INTERRUPTED
    return _loop(session, console)


def _loop(session: ChatSession, console: Console) -> int:
    """Read a message, stream the reply, until Ctrl-D, /exit or Ctrl-C at the prompt (a normal end: exit 0).
    A message that is not UTF-8 is not sent, and the chat goes on."""
    if hasattr(sys.stdin, "reconfigure"):  # keep undecodable bytes to name them, as a UTF-8 locale's stdin does
        sys.stdin.reconfigure(errors="surrogateescape")
    console.print(f"[dim]chatting with {session.model.num_parameters():,} parameters; Ctrl-C stops a reply, "
                  f"Ctrl-D or {EXIT} ends[/dim]")
    while True:
        try:
            text = console.input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return 0
        if text == EXIT:
            return 0
        try:
            require_utf8(text, "your message")
        except FlopwiseError as err:
            print(f"flopwise: note: {err}; it was not sent", file=sys.stderr)
            continue
        if text:
            sys.stdout.write(ANSWER)
            if not _answer(session, text):
                console.print("[dim](reply stopped)[/dim]")


def _answer(session: ChatSession, text: str) -> bool:
    """Stream one reply to stdout (a newline after it); False when Ctrl-C stopped it."""
    from flopwise.posttrain.chat import stream_reply

    finished = stream_reply(session, text, _write)
    sys.stdout.write("\n")
    if session.notice:
        print(f"flopwise: note: {session.notice}", file=sys.stderr)
    return finished


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
