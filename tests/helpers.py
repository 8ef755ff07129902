"""Helpers the test modules share (kept here, not imported from one test module into another)."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flopwise.cli import main
from flopwise.config import RunConfig, load_config
from flopwise.methods.base import World
from flopwise.methods.stack import MethodStack
from flopwise.model.gpt import GPT
from flopwise.model.hf import load_weights_into, model_config_from_hf, read_hf_config
from flopwise.resolve import ResolvedRun, resolve
from flopwise.rundir import read_metrics

# The same tiny run as config values (for load_config(values=...)), with one evaluation every quarter and no
# loss forecast: the sweep tests' base config.
# One shape for the whole run (no progressive methods), so that tests count steps, tokens and FLOPs as the run's own
# shape does; tests/test_progressive.py tests the default recipe's progressive training.
TINY_VALUES = {"data.tokenizer": "byte", "model.size": "tiny", "model.seq_len": 64, "optim.batch_size": 4,
               "train.eval_tokens": 2048, "train.eval_every": 0.25, "train.forecast_every": 0,
               "methods.progressive": False}
TINY = ["--tokenizer", "byte", "--set", "model.size=tiny", "--set", "model.seq_len=64",
        "--set", "optim.batch_size=4", "--set", "train.eval_tokens=2048", "--set", "train.log_every=1",
        "--set", "methods.progressive=false"]


def train(*args: str) -> int:
    return main(["train", *args])


def train_bpe_run(run: Path, text_folder: Path, *overrides: str) -> Path:
    """A tiny real 12-step run with a 400-token BPE tokenizer trained on ``text_folder`` (so text splits inside
    words), with ``--set`` ``overrides``."""
    args = [a for a in TINY if a not in ("--tokenizer", "byte")]
    sets = [flag for value in ("data.vocab_size=400", *overrides) for flag in ("--set", value)]
    assert main(["train", "--data", str(text_folder), "--budget", "12steps", "--out", str(run), *args, *sets]) == 0
    return run


def one_error_line(capsys: Any) -> str:
    """The one line a failed command wrote to stderr (asserting it wrote exactly one)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def run_error(capsys: Any, args: list[str]) -> str:
    """The CLI's one-line error for ``args``, asserting exit code 2 and the ``flopwise: error:`` form."""
    assert main(args) == 2
    err = one_error_line(capsys)
    assert err.startswith("flopwise: error: ")
    return err


def train_events(run: Path) -> list[dict]:
    return [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in train_events(run)]


def load_hf_model(folder: Path, seq_len: int | None = None) -> GPT:
    """A flopwise GPT with a Hugging Face folder's weights, training context ``seq_len`` (default: the
    folder's max_position_embeddings), as --init-from imports them."""
    config = read_hf_config(folder)
    model = GPT(model_config_from_hf(config, folder, seq_len or config.get("max_position_embeddings") or 2048))
    load_weights_into(model, folder)
    return model


def config_with(methods: list[str] = (), *overrides: str, **values: Any) -> RunConfig:
    """A run config using ``methods``, with ``--set``-style ``overrides`` and dotted ``values``."""
    return load_config(None, [f"methods.use={json.dumps(list(methods))}", *overrides], values)


def resolved_with(methods: list[str] = (), *overrides: str, world: World | None = None, **values: Any) -> ResolvedRun:
    """``config_with``'s config resolved, as a run about to train on ``world`` would be (None: only planned):
    where the methods' conflicts and checks are refused."""
    return resolve(config_with(methods, *overrides, **values), world)


def stack_of(methods: list[str] = (), *overrides: str, **values: Any) -> MethodStack:
    """The MethodStack a run with ``methods`` (and ``overrides``) builds."""
    config = config_with(methods, *overrides, **values)
    return MethodStack(config.methods, config.train.seed)


class FakeClock:
    """``time`` as the modules that spend seconds budgets and deadlines read it, for tests that must not
    depend on the machine's speed: its ``perf_counter`` stands still except where the test moves it.

    Each optimizer step through the trainer's ``train_step`` (which runs and the throughput probe both
    call) moves it on by ``step_seconds(model)``, so a seconds budget is spent in the same steps on a
    fast machine, a slow one or a busy one; ``advance`` moves it by hand.  Every other attribute
    (``strftime``...) is the real ``time`` module's."""

    MODULES = ("flopwise.train.trainer", "flopwise.plan.scan", "flopwise.plan.throughput", "flopwise.cli.scan")
    _installed = itertools.count()

    def __init__(self, step_seconds: Callable[[Any], float]) -> None:
        self.now = 1000.0
        self.steps = 0
        self.step_seconds = step_seconds

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def install(self, monkeypatch: Any) -> FakeClock:
        """Put this clock in place for the test (``monkeypatch``: pytest's fixture or a MonkeyPatch).  The
        throughput probes it times are cached apart from real ones and other fake clocks' (each install has
        its own cache file), so a plan reads this clock's step times, and reads them again from the cache."""
        import importlib

        from flopwise.plan import throughput
        from flopwise.train import trainer

        real_step = trainer.train_step

        def timed_step(model: Any, *args: Any, **kwargs: Any) -> float:
            loss = real_step(model, *args, **kwargs)
            self.steps += 1
            self.now += self.step_seconds(model)
            return loss

        monkeypatch.setattr(trainer, "train_step", timed_step)
        for name in self.MODULES:
            monkeypatch.setattr(importlib.import_module(name), "time", self)
        monkeypatch.setattr(throughput, "CACHE_FILE", f"throughput-fake-clock-{next(self._installed)}.json")
        return self


def width_step_seconds(model: Any) -> float:
    """A fake step time growing with the model's width like a CPU's at the tests' sizes, about twice an
    idle 2-core machine's (d_model 64: 32 ms, 96: 48 ms, at batch 4 x 64 tokens), so that fake-clocked
    runs take fewer real steps than their budgets would on it."""
    return 5e-4 * model.config.d_model


def sweep_setup(tmp_path: Path, text_folder: Path, lr_high: float = 3e-2) -> tuple[RunConfig, Path]:
    """A sweep's base config (TINY_VALUES on ``text_folder``) and a space file drawing ``optim.lr`` on a log
    scale from 1e-3 to ``lr_high``."""
    space_file = tmp_path / "space.toml"
    space_file.write_text(f"[optim.lr]\nlow = 1e-3\nhigh = {lr_high}\nlog = true\n", encoding="utf-8")
    return load_config(values={"data.sources": [str(text_folder)], **TINY_VALUES}), space_file


BENCH = Path(__file__).parents[1] / "bench"


def load_bench(name: str) -> Any:
    """A bench script as a module (bench/<name>.py), with bench/ importable as when it is run, for its
    shared helpers (bench/pinning.py)."""
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kill_at_first_checkpoint(process: Any, checkpoints: Path, what: str) -> None:
    """SIGKILL ``process`` (a subprocess.Popen) as soon as ``checkpoints`` holds a checkpoint: a machine or a
    process dying mid-run, after something to resume from exists."""
    deadline = time.monotonic() + 240
    while not (checkpoints.is_dir() and any(checkpoints.iterdir())) and process.poll() is None:
        assert time.monotonic() < deadline, f"{what} never wrote a checkpoint"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def serving(engine: Any, settings: Any) -> Iterator[str]:
    """``flopwise serve``'s app for ``engine`` on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    from flopwise.serve.app import build_app

    config = uvicorn.Config(build_app(engine, settings), host="127.0.0.1", port=0, log_level="warning")
    sock = config.bind_socket()
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# Chromium as the machine's notes start it: no sandbox (root), and none of its background calls to Google's hosts,
# which a closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def browser_missing(reason: str) -> None:
    """Skip where no browser is installed; fail where CI promises one (FLOPWISE_REQUIRE_BROWSER=1)."""
    import pytest

    if os.environ.get("FLOPWISE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (FLOPWISE_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


@contextlib.contextmanager
def headless_chromium() -> Iterator[Any]:
    """A Playwright browser on the machine's Chromium (/usr/bin/chromium, or $FLOPWISE_CHROMIUM)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_missing("playwright is not installed: pip install -e '.[test]'")
    chromium = Path(os.environ.get("FLOPWISE_CHROMIUM", "/usr/bin/chromium"))
    if not chromium.is_file():
        browser_missing(f"no Chromium at {chromium}: apt-get install -y chromium (or set FLOPWISE_CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


def watch_page_problems(page: Any, problems: list[str]) -> None:
    """Collect the page's console errors, uncaught errors and failed requests into ``problems``."""
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url[:80]}"))


def tiny_chat_model(seq_len: int = 128) -> GPT:
    """An untrained tiny model (seed 0) whose embedding covers the byte tokenizer with the chat tokens, as sft
    leaves it."""
    import torch

    from flopwise.data.tokenizer import byte_tokenizer
    from flopwise.model.config import ModelConfig
    from flopwise.posttrain.template import add_chat_tokens, resize_for_tokenizer

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=seq_len,
                            qk_norm=True))
    resize_for_tokenizer(model, add_chat_tokens(byte_tokenizer()).vocab_size)
    return model.eval()


def write_model_run(run: Path, model: GPT, tokenizer: Any) -> Path:
    """A run folder as `flopwise chat` and `serve` read it: config.toml (every default), plan.json (the model's
    shape) and final/ (weights and ``tokenizer``)."""
    from flopwise.model.hf import save_hf_folder

    run.mkdir(parents=True)
    (run / "config.toml").write_text("")
    (run / "plan.json").write_text(json.dumps({"model": model.config.to_dict()}))
    save_hf_folder(model, tokenizer, run / "final")
    return run
