"""`flopwise plan --replay DOMAIN`: how much general data to replay when continuing to pretrain a model
on a new domain, from a few pilot runs (the CMR law of flopwise/replay/law.py).

The starting model (``--init-from``) is evaluated first: its held-out loss on the new domain and on
the general data (every other domain, token-weighted) are the law's G0 and D0.  Each domain share of
``pilot_design`` is then trained for a third of the pilot tokens and extended to all of them from its
pre-decay checkpoint (WSD), so both lengths are fully annealed runs at the cost of one and a bit.  The
law fitted to the pilots gives the critical mixture ratio for the full run's tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from flopwise.budget import Budget
from flopwise.config import RunConfig
from flopwise.data.sources import parse_source
from flopwise.errors import FlopwiseError
from flopwise.methods.stack import MethodStack, domain_weights_config
from flopwise.replay.law import PAPER_EPSILON, ReplayPoint, critical_ratio, fit_replay_law, pilot_design

PILOT_SHARE = 0.1  # of the full run's tokens, across each share's pilot (default --pilot-tokens)
LENGTHS = (1 / 3, 1.0)


def split_losses(result: dict[str, Any], domain: str) -> tuple[float, float]:
    """(general loss, domain loss) of an evaluation: general = the other domains, token-weighted."""
    domains = result["domains"]
    if domain not in domains or len(domains) < 2:
        raise FlopwiseError(f"--replay {domain}: the data must hold domain '{domain}' and general data beside it "
                            f"(domains: {', '.join(domains)}): pass --data {domain}=PATH --data general=PATH")
    others = [d for name, d in domains.items() if name != domain]
    tokens = sum(d["tokens"] for d in others)
    return sum(d["loss"] * d["tokens"] for d in others) / tokens, domains[domain]["loss"]


def configured_weights(resolved: RunConfig, domains: list[str]) -> list[float] | None:
    """The weights a resolved config gives its ``domains`` (``--data NAME=PATH:WEIGHT``, methods.mixture.weights),
    None: the data's own shares."""
    return MethodStack(resolved.methods).domain_weights(resolved.data.sources, domains) if len(domains) > 1 else None


def share_weights(configured: list[float] | None, domain: str, ratio: float, domains: list[str]) -> dict[str, float]:
    """The domain gets ``ratio``; the general domains share the rest in the ``configured`` or equal proportions."""
    others = [d for d in domains if d != domain]
    given = {d: configured[domains.index(d)] if configured else 1.0 for d in others}
    total = sum(given.values())
    return {domain: ratio, **{d: (1 - ratio) * w / total for d, w in given.items()}}


def pilot(config: RunConfig, shares: dict[str, float], tokens: float) -> RunConfig:
    """A pilot of ``config`` on ``tokens`` tokens with each domain sampled at its share."""
    sources = [f"{spec.domain}={spec.path}" if spec.domain else spec.path  # weights: from the share
               for spec in map(parse_source, config.data.sources)]
    return config.replace(**domain_weights_config(shares),
                          **{"data.sources": sources, "train.forecast_every": 0.0, "train.checkpoint_every": 0.0},
                          **Budget(tokens=tokens).config_values())


def suggest_replay(config: RunConfig, domain: str, run_tokens: float, pilot_tokens: float | None, out: Path,
                   console: Console, tolerance: float = PAPER_EPSILON) -> dict[str, Any]:
    """Evaluate the start, run the pilots into ``out``, fit the law and return the suggestion."""
    from flopwise.api import resume, run
    from flopwise.session import start_new
    from flopwise.train.display import ProgressDisplay

    if not config.model.init_from:
        raise FlopwiseError("--replay plans continued pretraining: give the starting model with --init-from")
    quiet = ProgressDisplay(Console(quiet=True))
    pilot_tokens = pilot_tokens or PILOT_SHARE * run_tokens
    start = start_new(config, out / "start", quiet)  # a session records its tokenizer
    domains = start.data_record["corpus"]["domains"]
    configured = configured_weights(start.config, domains)  # as resolved: the weights the data implies too
    start_losses = start.evaluation.final()  # FINAL_EVAL_SCALE times the tokens of an evaluation during a run
    base_general, base_domain = split_losses(start_losses, domain)
    del start  # its model and optimizer are not needed during the pilots
    points: list[ReplayPoint] = []
    design = pilot_design(pilot_tokens, lengths=LENGTHS)
    for ratio in sorted({r for r, _ in design}):
        short, long = sorted(t for r, t in design if r == ratio)
        run_dir = out / f"share-{ratio:g}"
        shares = share_weights(configured, domain, ratio, domains)
        for tokens in (short, long):  # extendable: extended to more tokens, with one shape throughout
            summary = (run(pilot(config, shares, short), run_dir, display=quiet, extendable=True) if tokens == short
                       else resume(run_dir, Budget(tokens=tokens), display=quiet))
            general, own = split_losses(summary.final_eval, domain)
            points.append(ReplayPoint(ratio=ratio, tokens=tokens, general_loss=general, domain_loss=own))
            console.print(f"pilot share {ratio:g}, {tokens / 1e6:.2f}M tokens: general {general:.4f} "
                          f"(start {base_general:.4f}), {domain} {own:.4f} (start {base_domain:.4f})", highlight=False)
    law = fit_replay_law(points, base_general, base_domain)
    suggestion: dict[str, Any] = {
        "domain": domain, "run_tokens": run_tokens, "pilot_tokens": pilot_tokens, "tolerance": tolerance,
        "base_general_loss": base_general, "base_domain_loss": base_domain, "points": [vars(p) for p in points],
        "law": law.to_dict()}
    for name, tokens in (("at_pilots", pilot_tokens), ("at_run", run_tokens)):
        try:
            ratio = critical_ratio(law, tokens, base_general, tolerance / base_general)
            suggestion[name] = {"tokens": tokens, "critical_ratio": ratio,
                                "weights": share_weights(configured, domain, ratio, domains)}
        except FlopwiseError as error:  # no share qualifies: said, with the pilots kept
            suggestion[name] = {"tokens": tokens, "critical_ratio": None, "why": str(error)}
    return suggestion


def print_replay(console: Console, suggestion: dict[str, Any]) -> None:
    table = Table(title="replay pilots: held-out loss after continued pretraining")
    for column in ("domain share", "tokens", "general loss", f"{suggestion['domain']} loss"):
        table.add_column(column, justify="right")
    for point in suggestion["points"]:
        table.add_row(f"{point['ratio']:g}", f"{point['tokens'] / 1e6:.2f}M", f"{point['general_loss']:.4f}",
                      f"{point['domain_loss']:.4f}")
    console.print(table)
    for name, where in (("at_pilots", "the pilots' length"), ("at_run", "the run's length")):
        found = suggestion[name]
        head = f"critical mixture ratio at {where} ({found['tokens'] / 1e6:.2f}M tokens): "
        if found["critical_ratio"] is None:
            console.print(head + "none: " + found["why"].removeprefix("critical_ratio: "), highlight=False)
            continue
        weights = ", ".join(f"{domain} {weight:.3f}" for domain, weight in found["weights"].items())
        console.print(head + f"[bold]{found['critical_ratio']:.3f}[/bold] of '{suggestion['domain']}', mixture "
                      f"{weights}", highlight=False)
    console.print(f"(Gu et al. 2024: the largest share of new data that keeps the general loss within "
                  f"{suggestion['tolerance']:g} nats of the start's {suggestion['base_general_loss']:.4f}; the law "
                  "extrapolates in tokens, so trust the run's figure only a few times past the pilots, and if no "
                  "share qualifies, lower the learning rate, allow more (--replay-tolerance) or pilot longer)",
                  highlight=False)
