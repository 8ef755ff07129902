"""Direct preference optimization as the training loop's ``Objective``: pairs of replies to one prompt, the
policy's and the frozen reference's reply log-probabilities, and ``dpo_loss`` (flopwise/posttrain/losses.py).

A pair's two sides are rendered as whole conversations (prompt + reply), each with the mask of its reply, and
batched one per row, never packed: the chosen and the rejected reply must be scored alike, so neither may see
a neighbour's tokens or positions.  A batch holds the B chosen rows then the B rejected rows, in the same order
of pairs, so one forward scores both sides and the halves line up.

The order of pairs follows ``ConversationSampler``'s: a seeded permutation per epoch, a state of two ints for
an exact resume, and each rank taking its contiguous share of the global batch.

The reference is the starting model, frozen (eval mode, no gradients).  Its forwards are compute the budget
must count: the same every step, so ``dpo_flops_per_step`` counts them in each step's FLOPs, and a FLOP budget
ends at its last step as exactly as pretraining's does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.model.config import ModelConfig
from flopwise.model.flops import flops_per_token, forward_flops_per_token
from flopwise.posttrain.conversations import Message, PreferencePair
from flopwise.posttrain.losses import PreferenceOutcome, dpo_loss, reply_log_probs
from flopwise.posttrain.sampler import EpochOrder, PrepareStats, Rendered, check_same_data, check_share, prepare
from flopwise.posttrain.template import render
from flopwise.runtime import autocast


@dataclass(frozen=True)
class RenderedPair:
    """The prompt followed by each reply; each side's mask covers its reply (content and end token) only."""

    chosen: Rendered
    rejected: Rendered


def render_pair(tokenizer: Tokenizer, pair: PreferencePair, source: int) -> RenderedPair:
    """Both sides rendered by the chat template, as SFT renders a conversation ending in the reply."""
    def side(reply: str) -> Rendered:
        ids, mask = render(tokenizer, (*pair.prompt, Message("assistant", reply)))
        return Rendered.of(ids, mask, source)

    return RenderedPair(side(pair.chosen), side(pair.rejected))


def prepare_pairs(pairs: Sequence[RenderedPair], seq_len: int) -> tuple[list[RenderedPair], PrepareStats]:
    """Both sides cut to seq_len + 1 tokens (``prepare``); a pair is dropped when either side has no target left,
    since DPO compares the two replies and one without tokens gives no comparison.  Counts are of pairs:
    ``truncated`` when either side was cut."""
    kept: list[RenderedPair] = []
    truncated = 0
    for pair in pairs:
        sides, stats = prepare([pair.chosen, pair.rejected], seq_len)
        if stats.dropped:
            continue
        truncated += stats.truncated > 0
        kept.append(RenderedPair(*sides))
    return kept, PrepareStats(len(kept), truncated, len(pairs) - len(kept))


class PairBatch(NamedTuple):
    inputs: torch.Tensor  # [2B, T] int64: the B chosen rows, then the B rejected rows of the same pairs
    targets: torch.Tensor  # [2B, T] int64: the inputs shifted by one
    mask: torch.Tensor  # [2B, T] bool: targets[r, t] is a token of the reply (never prompt or padding)


def pair_batch(pairs: Sequence[RenderedPair], width: int, pad_id: int) -> PairBatch:
    """``pairs`` as rows of ``width`` positions, padded with ``pad_id`` (masked, and after the tokens, so a
    causal model's scores of the tokens do not depend on it)."""
    sides = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    inputs = np.full((len(sides), width), pad_id, dtype=np.int64)
    targets = np.full((len(sides), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sides), width), dtype=bool)
    for row, side in enumerate(sides):
        n = len(side.ids) - 1
        inputs[row, :n], targets[row, :n], mask[row, :n] = side.ids[:-1], side.ids[1:], side.mask[1:]
    return PairBatch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(mask))


class PairSampler:
    """Batches of ``batch_size`` pairs (all ranks together; each rank gets its contiguous share) of pairs
    already cut by ``prepare_pairs``, as rows of seq_len positions."""

    def __init__(self, pairs: Sequence[RenderedPair], seq_len: int, batch_size: int, seed: int, pad_id: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if not pairs:
            raise FlopwiseError("no preference pair has both replies within the window: use a longer "
                                "model.seq_len or shorter prompts")
        check_share(batch_size, rank, world_size, "pairs")
        lengths = [len(side.ids) for pair in pairs for side in (pair.chosen, pair.rejected)]
        if max(lengths) > seq_len + 1 or min(lengths) < 2:
            raise ValueError(f"each reply's conversation must have 2 to seq_len + 1 = {seq_len + 1} tokens "
                             f"(longest: {max(lengths)}): cut the pairs with prepare_pairs first")
        self.pairs = list(pairs)
        self.seq_len, self.batch_size, self.pad_id = seq_len, batch_size, pad_id
        self.rank, self.world_size = rank, world_size
        self.tokens = sum(lengths)
        self.progress = 0.0  # set by the Trainer each step; the order does not pace by it
        self.order = EpochOrder(len(self.pairs), seed)

    def domain_epochs(self) -> dict[str, float]:
        """Pairs taken (all ranks) over their number, under the one name the Trainer logs per domain."""
        return {"pairs": self.order.epochs}

    def next_batch(self) -> PairBatch:
        """This rank's pairs of the next global batch."""
        indices = [self.order.take() for _ in range(self.batch_size)]
        share = self.batch_size // self.world_size
        mine = indices[self.rank * share:(self.rank + 1) * share]
        return pair_batch([self.pairs[i] for i in mine], self.seq_len, self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {**self.order.state_dict(), "pairs": len(self.pairs), "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off; refuses a state saved over different pairs (counted in pairs and
        tokens, so a different seq_len's cut is caught too)."""
        check_same_data(state, "pairs", "preference pairs", len(self.pairs), self.tokens)
        self.order.load_state_dict(state)


def side_log_probs(model: torch.nn.Module, batch: PairBatch, device: torch.device, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P(chosen reply), log P(rejected reply)) per pair [B], from one forward over all rows."""
    with autocast(device, dtype):
        logits = model(batch.inputs.to(device))[0]
    scores = reply_log_probs(logits, batch.targets.to(device), batch.mask.to(device))
    return scores.chunk(2)


def freeze(reference: torch.nn.Module) -> torch.nn.Module:
    """``reference`` in eval mode without gradients: the fixed anchor DPO's rewards are measured from."""
    return reference.eval().requires_grad_(False)


def dpo_flops_per_step(cfg: ModelConfig, pairs_per_step: int, seq_len: int) -> float:
    """FLOPs of one DPO step: the policy trains on both rows of each pair (forward and backward) and the frozen
    reference runs forward on the same rows."""
    rows = 2 * pairs_per_step * seq_len
    return (flops_per_token(cfg) + forward_flops_per_token(cfg)) * rows


class DPOObjective:
    """Pairs from the sampler scored by DPO against the frozen ``reference``."""

    def __init__(self, sampler: PairSampler, reference: torch.nn.Module, beta: float) -> None:
        self.sampler = sampler
        self.reference = freeze(reference)
        self.beta = beta
        self.last_outcome: PreferenceOutcome | None = None

    def next_batch(self) -> PairBatch:
        return self.sampler.next_batch()

    def loss(self, model: torch.nn.Module, batch: PairBatch, device: torch.device, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the DPO loss to backpropagate, the same detached), the mean over the batch's pairs."""
        policy_chosen, policy_rejected = side_log_probs(model, batch, device, dtype)
        with torch.no_grad():
            reference_chosen, reference_rejected = side_log_probs(self.reference, batch, device, dtype)
        self.last_outcome = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                     self.beta)
        return self.last_outcome.loss, self.last_outcome.loss.detach()


class PreferenceEvaluator:
    """Held-out DPO loss, preference accuracy and mean reward margin on fixed pairs.  The reference's
    log-probabilities are computed once here, since the reference never changes; each pair is scored one per
    row, padded to its chunk's longest."""

    def __init__(self, pairs: Sequence[RenderedPair], reference: torch.nn.Module, beta: float, batch_size: int,
                 device: torch.device, dtype: torch.dtype, pad_id: int) -> None:
        self.beta, self.device, self.dtype = beta, device, dtype
        self.batches = [pair_batch(chunk, max(len(s.ids) for p in chunk for s in (p.chosen, p.rejected)) - 1,
                                   pad_id)
                        for chunk in (pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size))]
        self.pairs = len(pairs)
        self.reference_scores = self._scores(freeze(reference))

    @torch.no_grad()
    def _scores(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probabilities of all pairs [N] under ``model``."""
        sides = [side_log_probs(model, batch, self.device, self.dtype) for batch in self.batches]
        return torch.cat([c for c, _ in sides]), torch.cat([r for _, r in sides])

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        """DPO loss; reward accuracy (share of pairs whose chosen reply has the higher implicit reward) and mean
        reward margin (beta times nats), both measured from the reference; preference accuracy (share of pairs
        whose chosen reply the model itself finds likelier, so models compare without a reference); and the
        pair count.  The model's mode is put back."""
        was_training = model.training
        model.eval()
        chosen, rejected = self._scores(model)
        outcome = dpo_loss(chosen, rejected, *self.reference_scores, self.beta)
        model.train(was_training)
        return {"loss": float(outcome.loss), "reward_accuracy": float(outcome.accuracy),
                "reward_margin": float(outcome.margin.mean()),
                "preference_accuracy": float((chosen > rejected).float().mean()), "pairs": self.pairs}
