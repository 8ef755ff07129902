"""The code's structure: no module outside flopwise/methods/ names a method (each method's knowledge lives in its
method), the methods that act on pretraining's data declare it, the lists of methods in the docs are the
registry's, and no stage overrides the session."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import flopwise
from flopwise.methods.base import PRETRAIN, Method
from flopwise.methods.registry import BY_NAME, METHODS

ROOT = Path(flopwise.__file__).parent
DOCS = ROOT.parent
# Where a method's name is something else: the one place and why.  The test fails if an entry goes stale.
NOT_A_METHOD = {("plan/device_profile.py", "fp8"): "the dtype a device profile declares a peak for"}


def method_names_in(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, kind, name) of every registered method's name in ``tree`` as a string literal, an attribute or
    a part of an imported module's or name's path."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in BY_NAME:
            found.append((node.lineno, "string", node.value))
        elif isinstance(node, ast.Attribute) and node.attr in BY_NAME:
            found.append((node.lineno, "attribute", node.attr))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            paths = [alias.name for alias in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                paths.append(node.module)
            found += [(node.lineno, "import", part) for path in paths for part in path.split(".") if part in BY_NAME]
    return found


def test_the_finder_finds_names_in_strings_attributes_and_imports():
    tree = ast.parse('from flopwise.methods import galore\nx = "lora"\ny = config.methods.qat.group\nz = "lorax"\n')
    assert method_names_in(tree) == [(1, "import", "galore"), (2, "string", "lora"), (3, "attribute", "qat")]


def test_no_module_outside_methods_names_a_registered_method():
    found, allowed = [], set()
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("methods/"):
            continue
        for line, kind, name in method_names_in(ast.parse(path.read_text(encoding="utf-8"))):
            if (relative, name) in NOT_A_METHOD:
                allowed.add((relative, name))
            else:
                found.append(f"{relative}:{line}: {kind} '{name}'")
    assert found == []
    assert allowed == set(NOT_A_METHOD)  # every exception is still needed


# Hooks through which a method acts on pretraining's corpus, its loss or its step shapes, which other stages replace
# (``fill_from`` scores the imported model on windows of the corpus).
DATA_HOOKS = ("setup", "sampler_options", "attach", "next_batch", "loss", "step_shape", "domain_weights", "fill_from")


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_a_method_acting_on_pretraining_data_declares_that_it_is_for_pretraining(method):
    acts_on_data = any(getattr(method, hook) is not getattr(Method, hook) for hook in DATA_HOOKS)
    # a method whose term also has SFT's per-token form (token_loss) applies to SFT as well
    in_sft = method.token_loss is not Method.token_loss
    assert (method.stages == (("pretrain", "sft") if in_sft else PRETRAIN)) == acts_on_data
    if method.progressive:  # progressive schedules follow the share of the budget they were planned for
        assert not method.survives_extension


def listed_methods(text: str, kind: str) -> list[set[str]]:
    """The method names in each passage of ``text`` between ``<!-- methods: KIND -->`` and ``<!-- /methods -->``."""
    passages = re.findall(rf"<!-- methods: {kind} -->(.*?)<!-- /methods -->", text, flags=re.S)
    return [set(re.findall(r"\b[a-z0-9_]+\b", passage)) & set(BY_NAME) for passage in passages]


LISTS = {  # which methods each kind of list names
    "all": {m.name for m in METHODS},
    "every stage": {m.name for m in METHODS if m.stages is None},
    "pretraining only": {m.name for m in METHODS if m.stages == PRETRAIN},
    "progressive": {m.name for m in METHODS if m.progressive},
    "memory": {m.name for m in METHODS if m.saves_memory},
}
DOC_FILES = ("README.md", "docs/cli.md", "docs/configuration.md", "docs/post-training.md", "docs/methods.md")


def test_the_lists_of_methods_in_the_docs_are_the_registrys():
    seen = set()
    for name in DOC_FILES:
        text = (DOCS / name).read_text(encoding="utf-8")
        for kind, expected in LISTS.items():
            for listed in listed_methods(text, kind):
                assert listed == expected, f"{name}: the list of {kind} methods differs from the registry's"
                seen.add(name)
    assert seen == set(DOC_FILES)  # every file's lists are marked, so none is left unchecked


def test_no_stage_overrides_the_session():
    import flopwise.api  # noqa: F401  (imports the session and everything it runs)
    from flopwise.session import Session
    from flopwise.stages import REGISTERED, stage_class

    assert Session.__subclasses__() == []
    assert all(not issubclass(stage_class(name), Session) for name in REGISTERED)
