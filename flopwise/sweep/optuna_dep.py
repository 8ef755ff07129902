"""Optuna is an optional extra: import it here, or say in one line how to install it."""

from __future__ import annotations

from types import ModuleType

from flopwise.errors import FlopwiseError


def require_optuna() -> ModuleType:
    try:
        import optuna
    except ImportError:
        raise FlopwiseError("flopwise sweep needs the 'optuna' package: pip install 'flopwise[sweep]' "
                            "(or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # flopwise says what each trial did, once
    return optuna
