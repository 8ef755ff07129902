"""The ``flopwise`` command: train under a budget, evaluate, sample, plan, report.

Each subcommand lives in its own module here (its flags in ``register``, its work in ``cmd_<name>``);
the flags several commands share, and the one table from flag to config key, are in ``flags``.
Nothing outside this package imports it: it is the user's entry point, not a library.
"""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import os
import re
import sys
from collections.abc import Callable

from rich.console import Console

from flopwise import __version__
from flopwise.errors import EXIT_INTERRUPTED, FlopwiseError

# command -> (its module here, the function that registers its flags, the one that runs it), in the order
# `flopwise --help` lists them.  A command imports its own module only, when it runs: `flopwise train` takes its
# run folder's lock before anything heavy (scipy, the config's models, torch) is imported.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("train", "register", "cmd_train"),
    "sft": ("posttrain", "register_sft", "cmd_sft"), "dpo": ("posttrain", "register_dpo", "cmd_dpo"),
    "rl": ("posttrain", "register_rl", "cmd_rl"),
    "eval": ("eval", "register", "cmd_eval"),
    "sample": ("sample", "register", "cmd_sample"), "chat": ("chat", "register", "cmd_chat"),
    "serve": ("serve", "register", "cmd_serve"),
    "export": ("export", "register", "cmd_export"),
    "report": ("report", "register", "cmd_report"), "bench": ("bench", "register", "cmd_bench"),
    "memory": ("memory", "register", "cmd_memory"), "plan": ("plan", "register", "cmd_plan"),
    "fit": ("fit", "register", "cmd_fit"), "scan": ("scan", "register", "cmd_scan"),
    "sweep": ("sweep", "register", "cmd_sweep"),
    "data": ("data", "register", "cmd_data"),
}


def command_functions(command: str) -> tuple[Callable[[argparse._SubParsersAction], None],
                                             Callable[[argparse.Namespace, Console], int]]:
    """``command``'s register and run functions, importing its module."""
    module, register, handler = COMMANDS[command]
    loaded = importlib.import_module(f"flopwise.cli.{module}")
    return getattr(loaded, register), getattr(loaded, handler)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command`` alone: all that parsing its arguments needs."""
    parser = argparse.ArgumentParser(
        prog="flopwise", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the best language model a fixed budget allows: state the budget "
                    "(seconds, FLOPs, tokens, steps), give it text, and the run ends exactly at the "
                    "budget with its learning rate fully annealed.")
    parser.add_argument("--version", action="version", version=f"flopwise {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in [command] if command else COMMANDS:
        register, _ = command_functions(name)
        register(commands)
    return parser


# what to do about a filesystem failure, by errno
_OS_FIXES = {errno.ENOSPC: "free some space, or write elsewhere (--out, FLOPWISE_CACHE)",
             errno.EDQUOT: "free some space, or write elsewhere (--out, FLOPWISE_CACHE)",
             errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
             errno.EROFS: "write elsewhere (--out, FLOPWISE_CACHE)",
             errno.ELOOP: "a symbolic link on the path points back into itself: fix the link",
             errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
             errno.EISDIR: "give a file here, not a folder", errno.ENOENT: "check the path"}


def describe_os_error(err: OSError) -> str:
    """One line naming the path, the cause and what to do (a failure without a path, e.g. of the network, as
    it is)."""
    if not err.filename:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    path = f"'{err.filename}'" + (f" -> '{err.filename2}'" if err.filename2 else "")
    cause = (err.strerror or str(err)).lower()
    fix = _OS_FIXES.get(err.errno, "check the path and the disk")
    return f"{path}: {cause}: {fix}"


# a token that can only be a negative number (no flag starts with a digit), as Python 3.13's argparse reads it
_NEGATIVE_VALUE = re.compile(r"-\.?\d|-(inf|nan)", re.IGNORECASE)


def join_negative_values(argv: list[str]) -> list[str]:
    """``--budget -5s`` as ``--budget=-5s``: argparse before 3.13 takes a value such as ``-5s``, ``-1GiB`` or
    ``-1e3`` for a flag and says only that --budget expected one argument; joined, the value reaches the check
    that says what is wrong with it (a budget must be positive)."""
    joined: list[str] = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if "--" in joined:  # after '--' every token is a positional argument
            joined.append(token)
        elif _NEGATIVE_VALUE.match(token) and previous.startswith("--") and "=" not in previous and previous != "--":
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (None: this process's arguments) and return its exit code.

    Called as the command (``argv`` None: the ``flopwise`` script, ``python -m flopwise``), the process ends when
    this returns, and everything still alive is frozen out of the garbage collector first (``gc.freeze``): the
    collections of Python's teardown would otherwise walk torch's millions of objects, 0.5-2 s after the run has
    written and said everything.  What is alive then is released at exit as before, except what only a reference
    cycle holds, which is left to the operating system (Python does not promise its ``__del__`` at exit either);
    atexit handlers run as before."""
    code = run_command(join_negative_values(sys.argv[1:] if argv is None else argv))
    if argv is None:
        gc.freeze()
    return code


def run_command(argv: list[str]) -> int:
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    console = Console(soft_wrap=True)
    try:
        _, handler = command_functions(args.command)
        return handler(args, console)
    except FlopwiseError as err:
        print(f"flopwise: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # the reader went away (`flopwise sample ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush into the pipe
        return 0
    except OSError as err:  # a full disk, a permission, a path that is not a folder: never a traceback
        print(f"flopwise: error: {describe_os_error(err)}", file=sys.stderr)
        return FlopwiseError.exit_code
    except KeyboardInterrupt:
        print("flopwise: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
