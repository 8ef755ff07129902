"""Who may reach ``flopwise serve``: loopback only, unless a key guards it.  The key comes from a file or the
environment, never from the command line, where ``ps`` and the shell's history would show it."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from flopwise.errors import FlopwiseError

KEY_VARIABLE = "FLOPWISE_API_KEY"


def is_loopback(host: str) -> bool:
    """True for 'localhost' and the loopback addresses (127.0.0.0/8, ::1): only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def read_key(key_file: Path | None) -> str | None:
    """The API key from ``key_file`` (its first line) or else ``$FLOPWISE_API_KEY``; None when neither is given."""
    if key_file is not None:
        try:
            lines = key_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise FlopwiseError(f"--api-key-file '{key_file}' cannot be read ({type(error).__name__}): give a "
                                "UTF-8 file whose first line is the key") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise FlopwiseError(f"--api-key-file '{key_file}' is empty: write the key on its first line")
        return key
    key = os.environ.get(KEY_VARIABLE, "").strip()
    return key or None


def check_exposure(host: str, key: str | None) -> None:
    """Refuse, in one line, to listen beyond this machine without a key."""
    if key is None and not is_loopback(host):
        raise FlopwiseError(f"--host {host} would let other machines reach the model: give a key with "
                            f"--api-key-file FILE or ${KEY_VARIABLE} (clients send it as a Bearer token), or "
                            "serve on 127.0.0.1")
