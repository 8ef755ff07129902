"""Log-likelihoods, rolling log-likelihoods and greedy generations of a flopwise model: what the task engine,
in-run task evaluation and the lm-eval adapter (flopwise/evaluate/lm_eval_model.py) all call.

Text is split into context and continuation tokens as lm-eval does (``TemplateLM._encode_pair``): trailing
whitespace of the context moves to the continuation, the whole text is encoded and the context's own
encoding is cut off its front, and an empty context becomes the end-of-text token.  Too long a pair loses
tokens on the left, so that context and continuation fit the model's window.  So a task scores the same ids
here, through the adapter and through lm-eval's ``hf`` model on the exported folder.

Continuations that share a context reuse it: the context runs once into a KV cache, which is then copied
for all its continuations at once (a multiple-choice example's choices cost one context, not four).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from flopwise.data.tokenizer import Tokenizer
from flopwise.model.gpt import GPT
from flopwise.runtime import autocast

TokenPair = tuple[list[int], list[int]]


class TaskModel:
    """A model and its tokenizer, scored in eval mode without gradients (the caller's mode is restored)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype,
                 batch_size: int = 32) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device, self.dtype = device, dtype
        self.batch_size = batch_size

    @property
    def max_length(self) -> int:
        """Tokens the model attends over at once."""
        return self.model.config.context

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode_batch([text])[0]

    def encode_pair(self, context: str, continuation: str) -> TokenPair:
        """Context and continuation ids, split as lm-eval splits them (see the module's docstring)."""
        if not context:
            ids = self.encode(continuation)
            eos = self.tokenizer.eos_id
            return ([eos], ids) if not ids or ids[0] != eos else (ids[:1], ids[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.tokenizer.encode_batch([context + continuation, context])
        return head, whole[len(head):]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding would produce it) for each text pair."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs])

    @torch.no_grad()
    def loglikelihood_tokens(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        """The same for pairs of ids.  A pair that does not fit the window is scored in windows (see
        ``windows``); windows whose contexts are equal share one context pass."""
        pieces = []  # (pair index, context, continuation)
        for index, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError("a continuation must have at least one token")
            pieces += [(index, c, x) for c, x in windows(context + continuation, len(context), self.max_length)]
        groups: dict[tuple[int, ...], list[int]] = {}
        for number, (_, context, _) in enumerate(pieces):
            groups.setdefault(tuple(context), []).append(number)
        results = [(0.0, True)] * len(pairs)
        with self._evaluating():
            for context, members in groups.items():
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start:start + self.batch_size]
                    scores = self._score_group(list(context), [pieces[n][2] for n in chunk])
                    for number, (score, greedy) in zip(chunk, scores):
                        total, all_greedy = results[pieces[number][0]]
                        results[pieces[number][0]] = (total + score, all_greedy and greedy)
        return results

    def _score_group(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        model = self.model
        caches = model.new_cache(1)
        with autocast(self.device, self.dtype):
            first = model.logits(torch.tensor([context], device=self.device), caches)[:, -1:].float()
            rows = len(continuations)
            longest = max(len(c) for c in continuations)
            if longest > 1:  # the continuations' own tokens after the shared context, right-padded
                inputs = torch.zeros(rows, longest - 1, dtype=torch.long, device=self.device)
                for row, ids in enumerate(continuations):
                    inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
                rest = model.logits(inputs, [cache.repeat(rows) for cache in caches]).float()
                logits = torch.cat((first.expand(rows, -1, -1), rest), dim=1)
            else:
                logits = first.expand(rows, -1, -1)
        log_probs = F.log_softmax(logits, dim=-1)
        scores = []
        for row, ids in enumerate(continuations):
            target = torch.tensor(ids, device=self.device)
            row_log_probs = log_probs[row, :len(ids)]
            picked = row_log_probs.gather(1, target[:, None]).squeeze(1)
            greedy = bool((row_log_probs.argmax(dim=-1) == target).all())
            scores.append((float(picked.double().sum()), greedy))
        return scores

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """log P(text) of each whole text, its first token after end-of-text (lm-eval's rolling log-likelihood,
        in the same windows)."""
        encoded = [self.encode(text) for text in texts]
        scored = iter(self.loglikelihood_tokens([([self.tokenizer.eos_id], ids) for ids in encoded if ids]))
        return [next(scored)[0] if ids else 0.0 for ids in encoded]  # an empty text: log 1, as lm-eval's hf

    @torch.no_grad()
    def generate(self, context: str, until: Sequence[str], max_new_tokens: int) -> str:
        """The greedy continuation of ``context``, cut at the first of ``until`` (which is left out)."""
        ids = self.encode(context) or [self.tokenizer.eos_id]
        produced: list[int] = []
        text = ""
        with self._evaluating(), autocast(self.device, self.dtype):
            window = torch.tensor([ids[-self.max_length:]], device=self.device)
            for token in self.model.stream(window, max_new_tokens, temperature=0.0):
                if int(token) == self.tokenizer.eos_id:
                    break
                produced.append(int(token))
                text = self.tokenizer.decode(produced)
                if any(stop in text for stop in until):
                    break
        return cut_at(text, until)

    def _evaluating(self) -> _EvalMode:
        return _EvalMode(self.model)


def windows(ids: list[int], first: int, length: int) -> list[TokenPair]:
    """The tokens of ``ids`` from index ``first`` on, as (context, continuation) pairs that a model of window
    ``length`` can score: continuations of up to ``length`` tokens that predict each of those tokens once,
    each after as many of the tokens before it as fit one window (all but the last token are input).  A pair
    that fits is one window whose context loses tokens on the left, as lm-eval truncates; a longer
    continuation is scored in disjoint windows, as lm-eval's rolling log-likelihood is."""
    pairs = []
    for start in range(first, len(ids), length):
        end = min(start + length, len(ids))
        pairs.append((ids[max(0, end - 1 - length):start], ids[start:end]))
    return pairs


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of ``until``."""
    cut = min((text.find(stop) for stop in until if stop in text), default=len(text))
    return text[:cut]


class _EvalMode:
    """Puts a model in eval mode and back to the mode it had (a run's model goes back to training)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)

