"""A new stage lands without overriding anything of the session: a small example stage, defined here and
registered by one line, trains through the same engine as pretraining, SFT and DPO (resolve, meter, budget,
checkpoints, exact resume, the run folder, the final model) with its own data, objective and evaluation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import flopwise
from flopwise.config import load_config
from flopwise.data.tokenizer import Tokenizer, byte_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig
from flopwise.model.flops import flops_per_token
from flopwise.resolve import resolve
from flopwise.rundir import read_metrics
from flopwise.runtime import autocast
from flopwise.stages import REGISTERED
from flopwise.stages.base import Prepared, Shape, Stage, StageEvaluation, StageLoop
from flopwise.train.display import ProgressDisplay

HALF = 16  # each row: HALF random tokens, then the same HALF again


def copy_rows(generator: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    first = torch.randint(1, vocab, (rows, HALF), generator=generator)
    return torch.cat([first, first], dim=1)


class CopySampler:
    """Rows drawn from the run's seed and how many were drawn, so its state is one number."""

    def __init__(self, seed: int, rows: int, vocab: int) -> None:
        self.seed, self.rows, self.vocab, self.drawn, self.progress = seed, rows, vocab, 0, 0.0

    def next_batch(self) -> torch.Tensor:
        self.drawn += 1
        return copy_rows(torch.Generator().manual_seed(self.seed * 100_003 + self.drawn), self.rows, self.vocab)

    def domain_epochs(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = state["drawn"]


def copy_loss(model: torch.nn.Module, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Cross-entropy of the second half given the first: only the copied tokens count."""
    rows = rows.to(device)
    with autocast(device, dtype):
        logits = model(rows[:, :-1])[0]
    return F.cross_entropy(logits[:, HALF - 1:].float().reshape(-1, logits.shape[-1]), rows[:, HALF:].reshape(-1))


class CopyObjective:
    def __init__(self, sampler: CopySampler) -> None:
        self.sampler = sampler

    def next_batch(self) -> torch.Tensor:
        return self.sampler.next_batch()

    def loss(self, model: torch.nn.Module, batch: torch.Tensor, device: torch.device, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        loss = copy_loss(model, batch, device, dtype)
        return loss, loss.detach()


class CopyStage(Stage):
    """Learn to repeat a random sequence (an induction task) from scratch, with byte tokens."""

    name = "copy"

    @classmethod
    def shape(cls, config: Any) -> Shape:
        return Shape(config.model.build(byte_tokenizer().vocab_size))

    def prepare(self, tokenizer: Tokenizer | None, planned: ModelConfig | None) -> Prepared:
        model, optim = planned or self.context.model, self.context.config.optim
        tokens = optim.batch_size * optim.grad_accum * (2 * HALF - 1)
        return Prepared(byte_tokenizer(), model, tokens, flops_per_token(model) * tokens,
                        f"copy: rows of {HALF} random tokens, repeated", {"copy": {"half": HALF}})

    def build(self, model: Any, methods: Any) -> StageLoop:
        ctx = self.context
        sampler = CopySampler(ctx.config.train.seed, ctx.rank_batch, 64)
        heldout = copy_rows(torch.Generator().manual_seed(12345), 32, 64)  # the same rows every time

        def evaluate() -> dict[str, Any]:
            model.eval()
            with torch.no_grad():
                return {"loss": copy_loss(model, heldout, ctx.device, ctx.dtype).item()}
        evaluation = StageEvaluation(during=lambda tokens: evaluate(), final=evaluate, scores_start=True,
                                     forecasts=False,
                                     fields=lambda r: ({"val_loss": r["loss"]}, f"copy loss {r['loss']:.4f}"))
        return StageLoop(sampler, CopyObjective(sampler), evaluation)


@pytest.fixture
def copy_stage(monkeypatch) -> str:
    monkeypatch.setitem(REGISTERED, "copy", "tests.test_stages.CopyStage")  # the one line a new stage adds
    return "copy"


def copy_config(*overrides: str) -> Any:
    return load_config(None, ["posttrain.stage=copy", "model.size=tiny", "model.seq_len=64", "optim.batch_size=8",
                              "optim.lr=3e-3", "train.eval_every=0.5", "train.log_every=1", "budget.steps=40",
                              *overrides])


@pytest.mark.slow
def test_a_new_stage_trains_resumes_exactly_and_writes_the_run_folder(tmp_path, copy_stage):
    quiet = ProgressDisplay.quiet()
    summary = flopwise.run(copy_config(), tmp_path / "whole", display=quiet)
    assert summary.finished and summary.meter.steps == 40
    evals = [e for e in read_metrics(tmp_path / "whole" / "metrics.jsonl") if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 20, 40]  # the start scored first, then each half of the budget
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # it learned to copy
    assert load_config(tmp_path / "whole" / "config.toml").posttrain.stage == "copy"
    assert (tmp_path / "whole" / "final" / "model.safetensors").is_file()
    # stopped and resumed through the same engine: the same curve, bit for bit
    partial = flopwise.run(copy_config(), tmp_path / "part", stop_after="15steps", display=quiet)
    assert not partial.finished
    flopwise.resume(tmp_path / "part", display=quiet)
    curve = [(e["step"], e["loss"]) for e in read_metrics(tmp_path / "whole" / "metrics.jsonl")
             if e["event"] == "train"]
    assert curve == [(e["step"], e["loss"]) for e in read_metrics(tmp_path / "part" / "metrics.jsonl")
                     if e["event"] == "train"]


def test_the_methods_that_declare_a_stage_of_their_own_are_refused_in_a_new_one(copy_stage):
    assert resolve(copy_config('methods.use=["8bit"]')).methods == ["8bit"]  # acts on the optimizer: any stage
    with pytest.raises(FlopwiseError, match="methods.use 'z_loss' applies to the pretrain stage only, not to copy"):
        resolve(copy_config('methods.use=["z_loss"]'))
    assert resolve(copy_config()).methods == []  # the default progressive methods are pretraining's

