"""Pretraining (``flopwise train``): packed windows of the corpus, next-token cross-entropy as the methods shape
it, the held-out loss per domain and the run's tasks; a new run starts from random weights or from an imported
Hugging Face model (``--init-from``)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from flopwise.config import RunConfig
from flopwise.data.pipeline import PreparedData, prepare_data
from flopwise.data.sampler import PackedSampler
from flopwise.data.sources import uses_builtin_corpus
from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.evaluate.heldout import FINAL_EVAL_SCALE, Evaluator
from flopwise.evaluate.tasks.builtin import HeldoutText
from flopwise.evaluate.tasks.engine import evaluate_tasks
from flopwise.evaluate.tasks.resolve import check_run_tasks, resolve_tasks
from flopwise.evaluate.tasks.scoring import TaskModel
from flopwise.methods.base import Calibration, RunResources, World
from flopwise.methods.stack import MethodStack, int4_group
from flopwise.model.config import NAMED_SIZES, OPTIONS, ModelConfig
from flopwise.model.flops import count_parameters, flops_per_token
from flopwise.model.gpt import GPT
from flopwise.model.hf import load_weights_into, model_config_from_hf, read_hf_config, resolve_hf_source
from flopwise.rundir import is_run_dir
from flopwise.runtime import autocast
from flopwise.size import with_artifact
from flopwise.stages.base import Prepared, Shape, Stage, StageEvaluation, StageLoop

# Model fields that an --init-from model's config.json decides (a stock model has none of the speedrun options).
IMPORTED_SHAPE = {"size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_size", "mlp_hidden", "qk_norm",
                  "tie_embeddings", "rope_theta", *OPTIONS}
BYTE_VOCAB = 256 + 1  # the bytes and end-of-text


def heldout_fields(result: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The eval event's fields and display line for the held-out loss (flopwise/evaluate/heldout.py); every
    evaluation's fields hold ``val_loss``, the number the curve, the report and the forecast read."""
    fields = {"val_loss": result["loss"], "val_bpb": result["bpb"], "unigram_loss": result["unigram_loss"],
              "val_tokens": result["tokens"], "val_stride": result["stride"],
              "domains": {name: d["loss"] for name, d in result["domains"].items()}}
    line = f"val_loss {result['loss']:.4f}  bpb {result['bpb']:.4f}  ({result['tokens']:,} tokens)"
    if "artifact" in result:  # the model as final/ stores it (a size budget's precision)
        stored = result["artifact"]
        fields.update(artifact_precision=stored["precision"], artifact_loss=stored["loss"],
                      artifact_bpb=stored["bpb"])
        line += f"  final/ as stored ({stored['precision']}): val_loss {stored['loss']:.4f}"
    return fields, line


def imported_folder(spec: str) -> Path:
    """The model folder ``--init-from`` names: a finished flopwise run's final/ (a Hugging Face folder), a Hugging
    Face model folder, or a hub id."""
    path = Path(spec).expanduser()
    if not is_run_dir(path):
        return resolve_hf_source(spec)
    if not (path / "final" / "config.json").is_file():
        raise FlopwiseError(f"--init-from '{spec}' is a run without a final model: finish it first "
                            f"(flopwise train --resume {spec}), or give a model folder")
    return path / "final"


class PretrainStage(Stage):
    name = "pretrain"

    @classmethod
    def check(cls, config: RunConfig, world: World | None, new: bool) -> None:
        """An imported model's shape and tokenizer are its own (a new run's config cannot set them); tasks are
        scored during the run where the main process holds the whole model."""
        if new and config.model.init_from:
            clash = sorted(config.model.model_fields_set & IMPORTED_SHAPE)
            if clash:
                raise FlopwiseError(f"model.{clash[0]} cannot be set with --init-from: the shape comes from the "
                                    "imported model's config.json (only model.seq_len can be chosen)")
            if "tokenizer" in config.data.model_fields_set:
                raise FlopwiseError("data.tokenizer cannot be set with --init-from: the imported model's own "
                                    "tokenizer is used as is")
        check_run_tasks(config, world is not None and world.size > 1)

    @classmethod
    def shape(cls, config: RunConfig) -> Shape:
        """An imported model's shape (config.json, at model.seq_len), or the config's with the tokenizer's
        vocabulary: data.vocab_size for BPE (its bound until the tokenizer is trained), 257 for bytes, a
        tokenizer file's own."""
        m = config.model
        if m.init_from:
            folder = imported_folder(m.init_from)
            seq_len = m.seq_len or NAMED_SIZES[m.size]["seq_len"]
            return Shape(model_config_from_hf(read_hf_config(folder), folder, seq_len),
                         settles={"data.tokenizer": str(folder)})  # in config.toml: a resume reads the same one
        tokenizer = config.data.tokenizer
        if tokenizer == "bpe":
            return Shape(m.build(config.data.vocab_size), vocab_known=False)
        vocab = BYTE_VOCAB if tokenizer == "byte" else Tokenizer.load(tokenizer).vocab_size
        return Shape(m.build(vocab))

    def prepare(self, tokenizer: Tokenizer | None, planned: ModelConfig | None) -> Prepared:
        """The corpus, tokenized once (rank 0 writes the cache, the others read it), with the run's tokenizer:
        a resumed run's saved one, an imported model's, or one trained on the data."""
        c, started = self.context.config, time.perf_counter()
        if tokenizer is None and c.model.init_from:
            tokenizer = Tokenizer.load(Path(c.data.tokenizer))
        with self.context.ranks.main_first():
            self.data: PreparedData = prepare_data(c.data, c.train.seed, tokenizer)
        tokenizer = self.data.tokenizer
        model = planned or self.context.model
        if planned is None and not self.context.vocab_known:
            model = dataclasses.replace(model, vocab_size=tokenizer.vocab_size)
        if tokenizer.vocab_size > model.vocab_size:
            raise FlopwiseError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                                f"{model.vocab_size}: use the model's own tokenizer")
        t = c.train
        self.tasks = resolve_tasks(t.eval_tasks, self.heldout_text, t.seed, t.task_examples, "train.eval_tasks")
        tokens = c.optim.batch_size * c.optim.grad_accum * model.seq_len  # the whole job's
        corpus = self.data.corpus
        cached = "cached" if corpus.cache_hit else "tokenized"
        line = (f"data: {corpus.meta['tokens']['train']:,} train / {corpus.meta['tokens']['val']:,} held-out tokens "
                f"({cached}, {time.perf_counter() - started:.1f}s), vocab {tokenizer.vocab_size}"
                + self.data.stats.describe() + self.data.hygiene.describe())
        record = {"corpus": corpus.meta, "read": self.data.stats.to_dict(), "data": self.data.summary()}
        return Prepared(tokenizer, model, tokens, flops_per_token(model) * tokens, line, record)

    def heldout_text(self) -> HeldoutText:
        """The held-out documents as text, for the built-in tasks."""
        return HeldoutText.from_corpus(self.data.corpus, self.data.tokenizer,
                                       uses_builtin_corpus(self.context.config.data.sources))

    def initial_weights(self, model: GPT, methods: MethodStack) -> None:
        """The --init-from model's weights.  Where the methods train another shape than the imported one (width
        pruning), the imported model is loaded beside the run's and the methods fill it, scoring the imported
        one on windows of the training data; it is freed before the first step."""
        ctx = self.context
        folder = imported_folder(ctx.config.model.init_from)
        imported = model_config_from_hf(read_hf_config(folder), folder, model.config.seq_len)
        if imported == model.config:
            load_weights_into(model, folder)
            ctx.display.message(f"initialized from {folder}")
            return
        source = GPT(imported)
        load_weights_into(source, folder)
        calibration = Calibration(self.calibration_windows(methods.calibration_windows()), ctx.rank_batch,
                                  ctx.ranks.world_size)
        with autocast(ctx.device, ctx.dtype):
            methods.fill_from(source.to(ctx.device), model, calibration)
        ctx.display.message(f"initialized from {folder}: its {count_parameters(imported)['total']:,} parameters, "
                            f"scored on {len(calibration.windows)} windows of the training data, fill the run's "
                            f"{count_parameters(model.config)['total']:,}")

    def calibration_windows(self, count: int) -> torch.Tensor:
        """``count`` windows [count, seq_len] of the training tokens, the same on every process and at every
        restart (the run's seed; a sampler apart from the one the run trains from, whose order it leaves as is)."""
        corpus, seq_len = self.data.corpus, self.context.model.seq_len
        sampler = PackedSampler(corpus.train_tokens, seq_len, max(1, count), seed=self.context.config.train.seed,
                                domain_ranges=corpus.train_domain_ranges(), domain_names=corpus.domains)
        return sampler.next_batch().inputs

    def build(self, model: GPT, methods: MethodStack) -> StageLoop:
        """The methods' setup, the sampler they shape, the held-out evaluator and the task scorer."""
        ctx, c = self.context, self.context.config
        tokenizer, seq_len, batch = self.data.tokenizer, model.config.seq_len, c.optim.batch_size
        methods.setup(RunResources(self.data, c.data.sources, seq_len, tokenizer.to_json(), model.config.vocab_size,
                                   ctx.device, ctx.dtype, ctx.ranks, ctx.display.message,
                                   schedule=c.schedule.build()))
        corpus, options = self.data.corpus, methods.sampler_options()
        ranks = ctx.ranks
        sampler = PackedSampler(corpus.train_tokens, seq_len, ctx.rank_batch, seed=c.train.seed,
                                rank=ranks.rank, world_size=ranks.world_size,
                                domain_ranges=corpus.train_domain_ranges(), weights=options.weights,
                                domain_names=corpus.domains, difficulty=options.difficulty, pacing=options.pacing,
                                doc_starts=corpus.train_docs[:, 0] if c.data.windows == "doc_start" else None,
                                segment_token=tokenizer.eos_id if c.data.doc_mask else None)
        if sampler.layout != "stream":
            read = sampler.windows * seq_len / max(1, len(corpus.train_tokens))
            ctx.display.message(f"windows: {sampler.windows:,} that begin at a document or continue a long one; an "
                                f"epoch reads {read:.1%} of the training tokens (the heads of the documents cut at "
                                "a window's end twice)")
        methods.attach(sampler)
        evaluator = Evaluator(corpus, tokenizer.token_bytes(), seq_len, batch, ctx.device, ctx.dtype)
        task_model = TaskModel(model, tokenizer, ctx.device, ctx.dtype, batch)
        scale = c.train.eval_tokens * FINAL_EVAL_SCALE
        tasks = (lambda: evaluate_tasks(self.tasks, task_model, c.train.seed)) if self.tasks and ranks.is_main else None
        # during the run every k-th window of the final evaluation's, fewer while few tokens are trained, so that
        # the logged curve estimates what the final evaluation measures more precisely at a few % of the training
        evaluation = StageEvaluation(
            during=lambda tokens: evaluator(model, scale, stride=evaluator.in_run_stride(scale, tokens)),
            final=lambda: with_artifact(lambda scored: evaluator(scored, scale), model, c.artifact.precision,
                                        int4_group(c.methods)),
            fields=heldout_fields, tasks=tasks)
        return StageLoop(sampler, None, evaluation)
