"""flopwise as an lm-eval model: ``--model flopwise --model_args run=runs/x``.

Every request goes to the run's model through :class:`~flopwise.evaluate.tasks.scoring.TaskModel`, the
same calls flopwise's own task engine makes, so a task scores the same through lm-eval as through
``flopwise eval --tasks`` (and as lm-eval's ``hf`` model on the exported folder):

* ``loglikelihood``: lm-eval's own ``TemplateLM`` splits context and continuation into ids (as TaskModel
  does); the ids are scored by ``TaskModel.loglikelihood_tokens``, which runs a context shared by several
  continuations (a multiple-choice question's choices) once;
* ``loglikelihood_rolling``: the text after end-of-text in disjoint windows of the model's length, the
  windows lm-eval's ``hf`` model uses;
* ``generate_until``: greedy decoding, cut at the first of the request's ``until`` strings or end-of-text,
  at most ``max_gen_toks`` tokens (the request's, else the model argument's).  Sampling (``do_sample=True``
  or a temperature above 0) is refused.

Model arguments: ``run`` (a run folder, required), ``checkpoint`` (its newest checkpoint instead of its final
model), ``device`` (auto, cpu, cuda, cuda:N), ``precision`` (auto, fp32, bf16; default the run's
``train.precision``), ``batch_size`` (continuations of one context scored at once), ``max_gen_toks``
(default 256).  lm-eval 0.4.13 finds models only by ``@register_model``, which importing this module does:
``python -m flopwise.lm_eval`` (flopwise/lm_eval.py) is lm-eval's command line with it imported.  The
``lm_eval.models`` entry point in pyproject.toml names this class for lm-eval versions that read it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from flopwise.errors import FlopwiseError

try:
    # lm_eval.models first: it fills lm-eval's table of its own models, which lm-eval fills only while its registry
    # is empty, so registering flopwise into an empty one would hide "hf" and the others
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
    from lm_eval.utils import simple_parse_args_string
except ModuleNotFoundError as err:
    if not (err.name or "").startswith("lm_eval"):
        raise
    raise FlopwiseError("the lm-eval adapter needs the lm-eval package: pip install 'flopwise[eval]'") from None

from flopwise.config import load_run_config
from flopwise.evaluate.load import load_run_model
from flopwise.evaluate.tasks.scoring import TaskModel
from flopwise.runtime import choose_device, choose_dtype

NAME = "flopwise"
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_BATCH_SIZE = 32
# generation settings that greedy decoding honours or that do not change it
_MAX_TOKENS_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")  # lm-eval's order
_GREEDY_KEYS = {"until", "do_sample", "temperature", "top_k", "top_p", *_MAX_TOKENS_KEYS}

log = logging.getLogger(__name__)


class FlopwiseLM(TemplateLM):
    """A flopwise run's model (final, or newest checkpoint) as an lm-eval ``LM``."""

    def __init__(self, run: str | None = None, checkpoint: bool | str = False, device: str | None = "auto",
                 precision: str | None = None, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, max_batch_size: int | None = None) -> None:
        super().__init__()
        if not run:
            raise FlopwiseError("--model flopwise needs the run folder: --model_args run=runs/NAME")
        run_dir = Path(str(run)).expanduser()
        config = load_run_config(run_dir)
        self._device = _device(device)
        if precision not in (None, "auto", "fp32", "bf16"):
            raise FlopwiseError(f"model_args precision={precision} is not a precision: use auto, fp32 or bf16")
        dtype = choose_dtype(precision or config.train.precision, self._device)
        model, tokenizer = load_run_model(run_dir, self._device, _flag(checkpoint, "checkpoint"))
        self.task_model = TaskModel(model, tokenizer, self._device, dtype, _batch_size(batch_size, max_batch_size))
        self._max_gen_toks = _positive(max_gen_toks, "max_gen_toks")

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
                            ) -> FlopwiseLM:
        """The model from ``--model_args`` and lm-eval's own ``--device``, ``--batch_size``...: a model argument
        wins over the flag (lm-eval's command line passes its --device default, cuda:0, to every model, and
        lm-eval itself fails on a name given both ways)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None
                               ) -> FlopwiseLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------ what TemplateLM needs

    @property
    def eot_token_id(self) -> int:
        return self.task_model.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.task_model.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids without special tokens (flopwise models have no beginning-of-sequence token)."""
        return self.task_model.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.task_model.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = self.task_model.loglikelihood_tokens([(context, continuation)
                                                        for _, context, continuation in requests])
        for (pair, _, _), result in zip(requests, results):
            if pair is not None:  # lm-eval's request cache (--use_cache)
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        results = self.task_model.loglikelihood_rolling(texts)
        for text, result in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args[0], request.args[1]
            until, max_new_tokens = self._generation_settings(gen_kwargs)
            output = self.task_model.generate(context, until, max_new_tokens)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), output)
            outputs.append(output)
        return outputs

    def _generation_settings(self, gen_kwargs: dict[str, Any] | None) -> tuple[list[str], int]:
        """``until`` (a string or list) and the most tokens to generate; sampling refused in one line."""
        kwargs = dict(gen_kwargs or {})
        unknown = sorted(set(kwargs) - _GREEDY_KEYS)
        if unknown:
            raise FlopwiseError(f"generation setting {unknown[0]}={kwargs[unknown[0]]!r} is not supported by "
                                "--model flopwise, which decodes greedily: leave it out (it honours until and "
                                "max_gen_toks)")
        temperature = float(kwargs.get("temperature") or 0.0)
        if kwargs.get("do_sample") or (kwargs.get("do_sample") is None and temperature > 0):
            raise FlopwiseError(f"generation with do_sample={kwargs.get('do_sample')}, temperature={temperature} "
                                "samples, but --model flopwise decodes greedily: set do_sample=false (or "
                                "temperature=0) in the task's generation_kwargs or --gen_kwargs")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [stop for stop in until if stop]
        given = [kwargs[key] for key in _MAX_TOKENS_KEYS if kwargs.get(key) is not None]
        max_new_tokens = _positive(given[0], "max_gen_toks") if given else self.max_gen_toks
        return until, max_new_tokens


if NAME not in MODEL_REGISTRY:  # an lm-eval that read the entry point holds it already (a placeholder for us)
    register_model(NAME)(FlopwiseLM)


def _device(name: str | None) -> torch.device:
    """auto, cpu, cuda or cuda:N.  A CUDA device where there is none falls back to the CPU, as lm-eval's ``hf``
    model does: lm-eval's command line passes --device's default, cuda:0, to every model."""
    if name in (None, "", "auto"):
        return choose_device("auto")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        log.warning("flopwise: device %s asked for, but CUDA is not available here: using the CPU", name)
        return torch.device("cpu")
    return choose_device(str(name))


def _flag(value: bool | str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise FlopwiseError(f"model_args {name}={value} is not true or false")


def _batch_size(value: int | str | None, largest: int | None) -> int:
    """An integer, or lm-eval's ``auto`` / ``auto:N`` (flopwise's default, capped by --max_batch_size)."""
    if value is None or str(value).startswith("auto"):
        return min(DEFAULT_BATCH_SIZE, largest) if largest else DEFAULT_BATCH_SIZE
    return _positive(value, "batch_size")


def _positive(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise FlopwiseError(f"{name}={value} must be a positive whole number")
    return number
