"""``flopwise serve``: a run's model behind OpenAI's HTTP API (uvicorn, Starlette) and a chat page at ``/``."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from rich.console import Console

from flopwise.cli.flags import add_checkpoint_flag
from flopwise.errors import FlopwiseError


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "serve", help="serve a run over OpenAI's API, with a web chat page (pip install 'flopwise[serve]')",
        description="Serve a run's model over HTTP with OpenAI's API: GET /v1/models, POST /v1/chat/completions "
                    "(a run fine-tuned with sft or dpo: its chat template is applied), POST /v1/completions (any "
                    "run), GET /health, and a chat page at /.  Replies stream as server-sent events with "
                    "\"stream\": true; every response counts its tokens.  Requests take turns token by token "
                    "on one decode thread, each with its own KV cache and seed, so a seeded request gives the "
                    "same text alone or under load; beyond --max-concurrent they wait in a queue of --max-queue, "
                    "and beyond that get 429.  It listens on 127.0.0.1 by default; any other --host needs a key "
                    "(clients send it as 'Authorization: Bearer KEY').  SIGTERM or Ctrl-C stops taking requests, "
                    "finishes those in flight (up to --shutdown-timeout) and exits 0.  Manual: docs/serve.md.",
        epilog="examples:\n"
               "  flopwise serve runs/sft                       # http://127.0.0.1:8000/ : the chat page\n"
               "  flopwise serve runs/base --port 8080          # /v1/completions for a pretrained run\n"
               "  FLOPWISE_API_KEY=$(cat key) flopwise serve runs/sft --host 0.0.0.0\n"
               "  flopwise serve runs/sft --quantize int4       # the model its 4-bit export would be\n\n"
               "  python -c \"from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', "
               "api_key='none'); print(c.chat.completions.create(model='sft', messages=[{'role': 'user', "
               "'content': 'Hi'}]).choices[0].message.content)\"",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run folder: its final model, or with --checkpoint its newest checkpoint")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other needs a key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model's id in the API (default: the run folder's name)")
    add_checkpoint_flag(p)
    p.add_argument("--quantize", choices=("int4",), default=None,
                   help="serve the model rounded to int4 (round-to-nearest, as flopwise eval --quantize scores it)")
    p.add_argument("--group", type=int, default=None,
                   help="input columns per int4 scale (default: the run's methods.qat.group, else 32)")
    p.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help="file whose first line is the key clients must send (or set $FLOPWISE_API_KEY); never "
                        "given on the command line, where ps would show it")
    p.add_argument("--cors", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API; off by default")
    p.add_argument("--max-concurrent", type=int, default=32, metavar="N",
                   help="requests decoded at once, taking turns token by token; each holds a KV cache of the whole "
                        "context (default 32)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a turn; more get 429 (default 64)")
    p.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES",
                   help="largest request body; larger gets 413 (default 1 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long replies in flight may take to finish (default 30)")
    p.add_argument("--device", default="auto")


def cmd_serve(args: argparse.Namespace, console: Console) -> int:
    from flopwise.serve.access import check_exposure, read_key

    _check_limits(args)
    if args.group is not None and args.quantize is None:
        raise FlopwiseError(f"--group {args.group} sets the groups of --quantize int4: add --quantize int4, "
                            "or drop --group")
    key = read_key(args.api_key_file)
    check_exposure(args.host, key)
    uvicorn = _require_serve_extra()

    from flopwise.config import load_run_config
    from flopwise.evaluate.run import load_evaluated_model
    from flopwise.posttrain.template import add_chat_tokens
    from flopwise.serve.app import ServeSettings, build_app
    from flopwise.serve.engine import Engine

    model, tokenizer, device, _ = load_evaluated_model(args.run, load_run_config(args.run), args.device,
                                                       args.checkpoint, args.quantize, args.group)
    name = args.model_name or args.run.resolve().name
    settings = ServeSettings(name, add_chat_tokens(tokenizer) is tokenizer, key, args.cors, args.max_body)
    engine = Engine(model, tokenizer, args.max_concurrent, args.max_queue)
    config = uvicorn.Config(build_app(engine, settings), host=args.host, port=args.port, server_header=False,
                            timeout_graceful_shutdown=args.shutdown_timeout, log_level="info")
    try:
        sock = config.bind_socket()
    except SystemExit:  # uvicorn logs why (the port is taken) and exits 1
        raise FlopwiseError(f"cannot listen on {args.host}:{args.port}: choose another --port (0: any free one)"
                            ) from None
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    console.print(f"serving '{name}' ({model.num_parameters():,} parameters, {device}"
                  f"{', int4' if args.quantize else ''}) at {url}  (API: {url}v1, "
                  f"{'chat and completions' if settings.chat else 'completions only: not fine-tuned for chat'}"
                  f"{'; key required' if key else ''}); Ctrl-C stops", highlight=False)
    sys.stdout.flush()
    stopped = _exit_quietly_on_signals()
    uvicorn.Server(config).run(sockets=[sock])
    console.print(f"stopped{f' ({stopped[-1]})' if stopped else ''}", highlight=False)
    return 0


def _check_limits(args: argparse.Namespace) -> None:
    for flag, value, least in (("--max-concurrent", args.max_concurrent, 1), ("--max-queue", args.max_queue, 0),
                               ("--max-body", args.max_body, 1)):
        if value < least:
            raise FlopwiseError(f"{flag} {value} must be at least {least}")
    if not 0 <= args.port <= 65535:
        raise FlopwiseError(f"--port {args.port} must lie in 0..65535 (0: any free port)")
    if args.shutdown_timeout < 0:
        raise FlopwiseError(f"--shutdown-timeout {args.shutdown_timeout} must be 0 or more seconds")


def _require_serve_extra():  # -> the uvicorn module
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise FlopwiseError("flopwise serve needs the 'serve' extra: pip install 'flopwise[serve]' "
                            "(starlette and uvicorn)") from None
    return uvicorn


def _exit_quietly_on_signals() -> list[str]:
    """uvicorn finishes the requests in flight on SIGTERM/SIGINT, then raises the signal again for the handler
    that was there before it: this one records it, so the command ends with exit code 0, as a server stopped on
    purpose should."""
    stopped: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stopped.append(signal.Signals(number).name))
    return stopped
