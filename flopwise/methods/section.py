"""The run config's ``[methods]`` section, assembled from the registry: ``use``, ``progressive`` and one section
per method, validated by that method's own ``Config``; and where older config.toml files kept the methods'
settings (each method's ``legacy_keys`` and ``legacy_switch``), so that their runs still load.

flopwise/config.py composes this section with its own; no method imports the run config.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, create_model, field_validator

from flopwise.methods.registry import BY_NAME, METHODS
from flopwise.methods.stack import in_registry_order
from flopwise.section import Section, one_or_many

GENERIC_LEGACY_KEYS = {"memory.methods": "methods.use"}  # an older key that belongs to no one method


@functools.cache
def methods_section() -> type[BaseModel]:
    """``[methods]``: ``use`` (the methods of the run, each once, kept in registry order), ``progressive``
    (true: a new run that names no progressive method adds the default recipe's, where they apply) and one
    section per registered method, ``[methods.<name>]``, validated by that method's own ``Config``."""

    def known(cls: type, value: Any) -> list[str]:
        names = one_or_many(cls, value)
        unknown = [name for name in names if name not in BY_NAME]
        if unknown:
            raise ValueError(f"unknown method '{unknown[0]}': choose from {', '.join(BY_NAME)}")
        return in_registry_order(names)

    return create_model("MethodsSection", __base__=Section, __doc__=methods_section.__doc__,
                        __validators__={"_known": field_validator("use", mode="before")(known)},
                        use=(list[str], []),
                        progressive=(bool, True),
                        **{method.name: (method.Config, method.Config()) for method in METHODS})


@functools.cache
def legacy_keys() -> dict[str, str]:
    """Keys of config.toml files written before each method owned its section, and where they went."""
    return {**GENERIC_LEGACY_KEYS, **{old: f"methods.{method.name}.{key}" for method in METHODS
                                      for old, key in method.legacy_keys.items()}}


def legacy_switches() -> dict[str, tuple[str, Any]]:
    """The older key whose value said whether a method was on -> (the method, the value that meant off)."""
    return {method.legacy_switch[0]: (method.name, method.legacy_switch[1]) for method in METHODS
            if method.legacy_switch is not None}
