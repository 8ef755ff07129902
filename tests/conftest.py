"""Shared fixtures: a small local text corpus and an isolated cache, so tests run offline."""

from __future__ import annotations

import pydoc_data.topics
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory) -> Path:
    """About 200 KB of English prose in 40 .txt files (Python's own help topics)."""
    folder = tmp_path_factory.mktemp("texts")
    topics = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    for index in range(40):
        (folder / f"doc{index:02d}.txt").write_text("\n\n".join(topics[index::40])[:5000], encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def code_folder(tmp_path_factory) -> Path:
    """About 150 KB of Python source: the first 5000 characters of 30 standard-library modules."""
    import sysconfig

    folder = tmp_path_factory.mktemp("code")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for module in sorted(stdlib.glob("*.py"))[:30]:
        (folder / module.name).write_text(module.read_text(encoding="utf-8", errors="replace")[:5000],
                                          encoding="utf-8")
    return folder


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory) -> Path:
    """Point flopwise's cache at a temporary folder shared by all tests of one session."""
    import os

    cache = tmp_path_factory.mktemp("cache")
    os.environ["FLOPWISE_CACHE"] = str(cache)
    return cache



@pytest.fixture
def one_thread():
    """Tiny ops run fastest on one thread, above all when other processes share the cores
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module of tiny models)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def base(tmp_path_factory, text_folder) -> Path:
    """A tiny pretrained run (12 steps, byte tokenizer, 96-token window, on ``text_folder``: quick to prepare): the
    start of the post-training tests."""
    from flopwise.cli import main
    from tests.helpers import TINY

    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "--data", str(text_folder), "--budget", "12steps", "--out", str(run), *TINY,
                 "--set", "model.seq_len=96"]) == 0
    return run
