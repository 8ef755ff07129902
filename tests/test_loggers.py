"""Optional TensorBoard and W&B sinks, fed event dicts shaped like the trainer's (no training)."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterator

import pytest

from flopwise.errors import FlopwiseError
from flopwise.rundir import read_metrics
from flopwise.train.loggers import open_run_logger, scalars

TOKENS_PER_STEP = 256


def train_event(step: int) -> dict[str, Any]:
    return {"event": "train", "step": step, "p": step / 20, "p_lr": step / 20, "tokens": float(step * TOKENS_PER_STEP),
            "flops": step * 1.5e9, "seconds": step * 0.1, "wall": step * 0.11, "lr": 1e-3 * step,
            "loss": 5.0 - 0.1 * step, "throughput": 2560.0 + step, "mfu": 0.01 * step,
            "memory": None if step % 2 else 1_000_000 + step}


def eval_event(step: int) -> dict[str, Any]:
    return {"event": "eval", "step": step, "p": step / 20, "tokens": float(step * TOKENS_PER_STEP),
            "flops": step * 1.5e9, "seconds": step * 0.1, "val_loss": 4.0 - 0.05 * step, "val_bpb": 1.5 - 0.01 * step,
            "domains": {"prose": 4.2 - 0.05 * step, "code": 3.8 - 0.05 * step}}


def events(steps: range) -> list[dict[str, Any]]:
    out = []
    for step in steps:
        out.append(train_event(step))
        if step % 4 == 0:
            out.append(eval_event(step))
    return out


def expected(fed: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """tag -> step -> value, the last value fed for a step winning."""
    table: dict[str, dict[int, float]] = {}
    for event in fed:
        for tag, value in scalars(event).items():
            table.setdefault(tag, {})[event["step"]] = value
    return table


def test_task_scores_are_logged_per_task() -> None:
    event = {"event": "tasks", "step": 5, "p": 0.5, "tokens": 100.0, "flops": 1.0, "seconds": 2.0, "eval_seconds": 0.3,
             "tasks": {"next_line": {"centered": 0.2, "acc": 0.4, "acc_norm": 0.45, "acc_bytes": 0.4, "n": 20,
                                     "random": 0.25, "low": 0.1, "high": 0.3},
                       "qa": {"centered": 0.5, "exact_match": 0.5, "n": 4, "random": 0.0, "low": 0.0, "high": 1.0}}}
    assert scalars(event) == pytest.approx({"tasks/next_line/centered": 0.2, "tasks/next_line/acc": 0.4,
                                            "tasks/next_line/acc_norm": 0.45, "tasks/next_line/acc_bytes": 0.4,
                                            "tasks/qa/centered": 0.5, "tasks/qa/exact_match": 0.5})


def test_scalars_keys() -> None:
    assert scalars(train_event(3)) == pytest.approx({"train/loss": 4.7, "train/lr": 3e-3, "train/throughput": 2563.0,
                                                     "train/mfu": 0.03})  # memory None: left out
    assert set(scalars(train_event(2))) == {"train/loss", "train/lr", "train/throughput", "train/mfu", "train/memory"}
    assert scalars(eval_event(4)) == pytest.approx({"eval/loss": 3.8, "eval/bpb": 1.46, "eval/loss/prose": 4.0,
                                                    "eval/loss/code": 3.6})


def test_importing_loads_neither_backend() -> None:
    code = ("import sys, flopwise.train.loggers; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb') "
            "or m.startswith('torch.utils.tensorboard')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_backend_writes_only_metrics(tmp_path: Path) -> None:
    fed = events(range(1, 6))
    with open_run_logger(tmp_path, [], {}, None, "p") as log:
        for event in fed:
            log.append(event)
    assert read_metrics(tmp_path / "metrics.jsonl") == fed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("backend, modules", [("tensorboard", ["tensorboard", "torch.utils.tensorboard"]),
                                              ("wandb", ["wandb"])])
def test_missing_package_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str,
                                           modules: list[str]) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # what a missing package looks like to import
    with pytest.raises(FlopwiseError) as info:
        open_run_logger(tmp_path, ["tensorboard", "wandb"] if backend == "wandb" else [backend], {}, None, "p")
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"--log {backend} needs the '{backend}' package: pip install 'flopwise[{backend}]' "
                       f"(or pip install {backend})")
    assert list(tmp_path.iterdir()) == []  # checked before any sink opened


# --- TensorBoard --------------------------------------------------------------------------------------------

def read_tensorboard(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}


def assert_tables_close(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]]) -> None:
    assert set(got) == set(want)
    for tag in want:
        assert got[tag].keys() == want[tag].keys(), tag
        assert got[tag] == pytest.approx(want[tag], rel=1e-6), tag  # stored as float32


def next_second() -> None:
    """Event files are named by the second they were opened in and read in name order: keep two apart."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def test_tensorboard_scalars_per_step(tmp_path: Path) -> None:
    fed = events(range(1, 13))
    with open_run_logger(tmp_path, ["tensorboard"], {}, None, "p") as log:
        for event in fed:
            log.append(event)
    assert read_metrics(tmp_path / "metrics.jsonl") == fed
    want = expected(fed)
    assert set(want) == {"train/loss", "train/lr", "train/throughput", "train/mfu", "train/memory",
                         "eval/loss", "eval/bpb", "eval/loss/prose", "eval/loss/code"}
    assert sorted(want["train/memory"]) == [2, 4, 6, 8, 10, 12]  # None values are not logged
    assert_tables_close(read_tensorboard(tmp_path / "tensorboard"), want)
    by_tokens = read_tensorboard(tmp_path / "tensorboard" / "tokens")
    assert_tables_close(by_tokens, {f"{tag}_vs_tokens": {s * TOKENS_PER_STEP: v for s, v in want[tag].items()}
                                    for tag in ("train/loss", "eval/loss", "eval/bpb")})


def test_tensorboard_resume_purges_events_after_checkpoint(tmp_path: Path) -> None:
    first = events(range(1, 11))  # the interrupted run logged up to step 10, checkpointed at step 6
    with open_run_logger(tmp_path, ["tensorboard"], {}, None, "p") as log:
        for event in first:
            log.append(event)
    next_second()
    resumed = [dict(event, loss=event["loss"] + 100) if event["event"] == "train" else event
               for event in events(range(7, 15))]  # values that differ from the first run's
    with open_run_logger(tmp_path, ["tensorboard"], {}, 6, "p") as log:
        for event in resumed:
            log.append(event)
    want = expected([event for event in first if event["step"] <= 6] + resumed)
    assert_tables_close(read_tensorboard(tmp_path / "tensorboard"), want)
    by_tokens = read_tensorboard(tmp_path / "tensorboard" / "tokens")
    assert by_tokens["train/loss_vs_tokens"] == pytest.approx(
        {s * TOKENS_PER_STEP: v for s, v in want["train/loss"].items()}, rel=1e-6)


# --- Weights & Biases ---------------------------------------------------------------------------------------

@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Offline W&B with every folder it touches under tmp_path; nothing may leave the machine."""
    for name in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME"):
        monkeypatch.delenv(name, raising=False)
    dead = "http://127.0.0.1:9"  # the discard port: anything that tried the network would fail here, locally
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_BASE_URL": dead,
           "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead,
           "WANDB_DIR": str(tmp_path / "wandb-dir"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    connect = socket.socket.connect

    def local_only(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"W&B offline tried the network: {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    import wandb

    wandb.teardown()  # W&B keeps its settings process-wide from the first init: read this test's env afresh
    yield
    wandb.teardown()


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline run's ``run-<id>.wandb`` file (what ``wandb sync`` uploads):
    a 7-byte header, then LevelDB-log chunks (crc32, length, type) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(path: Path) -> dict[str, dict[int, float]]:
    """key -> step -> value, from the history records of an offline run."""
    table: dict[str, dict[int, float]] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_"):
                    table.setdefault(key, {})[record.history.step.num] = value
    return table


def wandb_flush() -> None:
    """finish() can return before W&B's service process has written the run file out; its shutdown
    (which a process exit runs too) waits for that."""
    import wandb

    wandb.teardown()


def offline_runs(run_dir: Path, run_id: str) -> list[Path]:
    return sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


@pytest.mark.slow
def test_wandb_offline_run_and_resume(tmp_path: Path, wandb_offline: None) -> None:
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    config = {"model": {"size": "tiny"}, "budget": {"steps": 20}}
    first = events(range(1, 9))
    with open_run_logger(run_dir, ["wandb"], config, None, "flopwise-test") as log:
        assert log.sinks[0].run.name == "demo" and log.sinks[0].run.project == "flopwise-test"
        for event in first:
            log.append(event)
    wandb_flush()
    run_id = json.loads((run_dir / "wandb.json").read_text())["id"]
    assert len(run_id) == 8 and run_id.isalnum()
    assert read_metrics(run_dir / "metrics.jsonl") == first
    [path] = offline_runs(run_dir, run_id)
    assert not (tmp_path / "wandb-dir").exists()  # dir=run_dir wins over WANDB_DIR

    history = wandb_history(path)
    progress = {"progress/tokens": {e["step"]: e["tokens"] for e in first},
                "progress/flops": {e["step"]: e["flops"] for e in first},
                "progress/p": {e["step"]: e["p"] for e in first}}
    assert_tables_close(history, {**expected(first), **progress})
    [run_record] = [r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
    assert run_record.run_id == run_id and run_record.display_name == "demo"
    logged_config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert logged_config["model"] == {"size": "tiny"}
    assert logged_config["budget"] == {"steps": 20}

    next_second()  # offline run folders are named by the second they start in
    second = events(range(5, 13))
    with open_run_logger(run_dir, ["wandb"], config, 4, "flopwise-test") as log:
        assert log.sinks[0].run.id == run_id
        for event in second:
            log.append(event)
    wandb_flush()
    assert json.loads((run_dir / "wandb.json").read_text())["id"] == run_id
    paths = offline_runs(run_dir, run_id)
    assert len(paths) == 2 and paths[0] == path
    assert_tables_close(wandb_history(paths[1]), {**expected(second), **{key: {e["step"]: e[key.split("/")[1]]
                                                                          for e in second} for key in progress}})


def test_wandb_without_api_key_is_one_line_error(tmp_path: Path, wandb_offline: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(FlopwiseError) as info:
        open_run_logger(tmp_path, ["wandb"], {}, None, "p")
    message = str(info.value)
    assert "\n" not in message and message.startswith("--log wandb could not start a W&B run: ")
    assert "WANDB_MODE=offline" in message


def test_wandb_skips_steps_the_resumed_run_has_and_marks_failures(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """What an online resume looks like (history up to step 8 on the server), with a stand-in module."""
    calls: dict[str, Any] = {"log": []}

    class Run:
        starting_step = 9

        def log(self, values: dict[str, float], step: int) -> None:
            calls["log"].append(step)

        def finish(self, exit_code: int = 0) -> None:
            calls["finish"] = exit_code

    def init(**kwargs: Any) -> Run:
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Error=Exception))
    (tmp_path / "wandb.json").write_text('{"id": "keep1234"}')
    with pytest.raises(RuntimeError):
        with open_run_logger(tmp_path, ["wandb"], {"a": 1}, 6, "proj") as log:
            for event in events(range(7, 12)):
                log.append(event)
            raise RuntimeError("crash")
    assert calls["init"] == {"project": "proj", "name": tmp_path.name, "dir": str(tmp_path), "config": {"a": 1},
                             "id": "keep1234", "resume": "allow", "allow_val_change": True}
    assert calls["log"] == [9, 10, 11]
    assert calls["finish"] == 1
    assert [e["step"] for e in read_metrics(tmp_path / "metrics.jsonl")] == [7, 8, 8, 9, 10, 11]


# --- through the CLI ---------------------------------------------------------------------------------------

def test_training_with_log_tensorboard_mirrors_metrics(tmp_path: Path, text_folder: Path) -> None:
    from flopwise.cli import main
    from tests.helpers import TINY

    run = tmp_path / "run"
    assert main(["train", "--data", str(text_folder), "--budget", "8steps", "--log", "tensorboard",
                 "--out", str(run), *TINY]) == 0
    assert "log = [\"tensorboard\"]" in (run / "config.toml").read_text()
    logged = read_tensorboard(run / "tensorboard")
    recorded = read_metrics(run / "metrics.jsonl")
    assert logged["train/loss"] == pytest.approx({e["step"]: e["loss"] for e in recorded if e["event"] == "train"},
                                                 rel=1e-6)
    final_eval = [e for e in recorded if e["event"] == "eval"][-1]  # the run's last event is its wall clock
    assert logged["eval/loss"][8] == pytest.approx(final_eval["val_loss"], rel=1e-6)


def test_training_with_a_missing_backend_fails_before_writing(tmp_path: Path, text_folder: Path,
                                                              monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from flopwise.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["train", "--data", str(text_folder), "--budget", "8steps", "--log", "wandb",
                 "--out", str(tmp_path / "run")]) == 2
    assert "--log wandb needs the 'wandb' package: pip install 'flopwise[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
