"""The one exception type users see (a clear one-line message, exit code 2), and the one-line warning."""

import sys


class FlopwiseError(Exception):
    """Bad input from the user (file, field or value) with the fix in the message.

    The CLI prints it as a single line and exits with status 2; nothing is written half-way.
    """

    exit_code = 2


EXIT_INTERRUPTED = 130  # as a shell reports a process ended by Ctrl-C: the run stopped, checkpointed where it could


def warn(line: str) -> None:
    """Tell the user, in one line on stderr, of something the run went on past (a damaged cache rebuilt, a
    broken log line skipped)."""
    print(f"flopwise: warning: {line}", file=sys.stderr)
