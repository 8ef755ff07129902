"""``python -m flopwise.lm_eval``: lm-eval's own command line, with flopwise registered as ``--model flopwise``.

    python -m flopwise.lm_eval --model flopwise --model_args run=runs/x --tasks my_task --include_path my_tasks/

takes exactly lm-eval's arguments (``run`` and the other subcommands too, and lm-eval's shorthand without
``run``); it only imports the adapter first (flopwise/evaluate/lm_eval_model.py), because lm-eval 0.4.13 finds
models by ``@register_model`` alone, not yet by the ``lm_eval.models`` entry point flopwise declares.  Without
lm-eval installed, or on flopwise's own bad input (no run folder...), it prints one ``flopwise: error:`` line
and exits with status 2.
"""

from __future__ import annotations

import importlib
import sys

from flopwise.errors import FlopwiseError


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's command line on ``argv`` (default: this process's arguments); its exit status."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]  # lm-eval's parser reads sys.argv itself
    try:
        importlib.import_module("flopwise.evaluate.lm_eval_model")  # registers --model flopwise (first: without
        # lm-eval it raises the one-line error that says how to install it)
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    except FlopwiseError as err:
        print(f"flopwise: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
