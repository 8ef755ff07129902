"""``flopwise scan``: pilot runs that fit the scaling law for this data, recipe and device, saved
for ``flopwise plan`` and ``train --auto``."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from flopwise.budget import format_amount
from flopwise.cli.fit import print_law
from flopwise.cli.flags import add_setup_flags, config_from_args
from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.rundir import check_output
from flopwise.scaling.law_file import LAW_FILE, cached_law_path, read_law, setup_key

if TYPE_CHECKING:
    from flopwise.plan.scan import Scan

SCAN_EPILOG = """\
design: three sizes of the shape family whose longest pilot sees between 1.5 and 40 tokens per
parameter (the sizes that would be compute-optimal for budgets of 0.5x to 13x that pilot), each
trained for t, then extended to 2t and 4t from its checkpoint before the learning-rate decay
(warmup-stable-decay makes each length a fully annealed run of that budget, for 4.6t instead of
7t). The law is fitted to the final held-out losses (Huber loss on log L, as Hoffmann et al.
2022), with 200 bootstrap refits for its uncertainty, and saved for this setup so that
`flopwise plan` and `train --auto` use it.  Pilots that end before their size's loss has settled
after its steepest fall (on the default corpus: the sudden drop when induction heads form, at
1-3M tokens) are left out when 6 others remain; otherwise the law says it will be optimistic
beyond its pilots, and the scan prints how long a scan of those sizes would pilot past the drop
on this device, and what adding a length to this one (--extend) would take.

examples:
  flopwise scan --budget 15m --out scans/stdlib
  flopwise scan --budget 10m --data ./texts/ --set optim.batch_size=16
  flopwise scan --extend scans/stdlib --budget 20m   # add lengths 8t, 16t, ... to a finished scan
"""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("scan", help="pilot runs that fit the scaling law for this data and device",
                            description="Spend a small budget on pilot runs (sizes x lengths) and fit the law "
                                        "that `flopwise plan` then uses for this data, recipe and device.",
                            epilog=SCAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_flags(p, "wall-clock time the whole scan may take, e.g. 15m")
    p.add_argument("--out", type=Path, help="scan folder (default: scans/<date-time>)")
    p.add_argument("--extend", type=Path, metavar="SCAN",
                   help="a finished scan folder: spend --budget on lengths twice its longest (then 4x, ...), "
                        "each size continuing from before its longest pilot's decay, and refit; give the "
                        "setup flags the scan was run with")


def cmd_scan(args: argparse.Namespace, console: Console) -> int:
    from flopwise.plan.scan import Scan, design_scan
    from flopwise.plan.throughput import ThroughputCache
    from flopwise.resolve import resolve
    from flopwise.runtime import device_name
    from flopwise.scaling.shapes import family_shape

    started = time.perf_counter()
    out = check_scan_folder(args)  # before the throughput probe: a wrong folder is known at once
    config = config_from_args(args)
    budget = config.budget.build()
    if set(budget.set_limits()) != {"seconds"}:
        raise FlopwiseError(f"scan --budget {budget.describe()}: give the scan's wall-clock time only, e.g. 15m")
    if config.model.init_from:
        raise FlopwiseError("a scan trains models of several sizes from scratch: drop --init-from")
    vocab = resolve(config, extendable=True, settle_memory=False).model.vocab_size  # its pilots are extended
    decay_start = config.schedule.build().decay_start
    throughput = ThroughputCache.for_config(config)
    key = setup_key(config, device_name(throughput.device))
    if args.extend:
        scan = reopen_scan(args, config, key, decay_start, budget.seconds - (time.perf_counter() - started), console)
        law = scan.extend(key)
    else:
        design = design_scan(budget.seconds, lambda width: family_shape(config.model, width, vocab),
                             lambda cfg: throughput.tokens_per_second(cfg, config), decay_start)
        sizes = ", ".join(f"{s.d_model} ({s.non_embedding / 1e6:.2f}M)" for s in design.sizes)
        lengths = ", ".join(f"{t:.0f}s" for t in design.lengths())
        remaining = budget.seconds - (time.perf_counter() - started)
        console.print(f"scan: sizes d_model {sizes}; lengths {lengths} (extended from one run per size); "
                      f"{remaining:.0f}s left", highlight=False)
        scan = Scan(config, out, design, remaining, console)
        law = scan.run(key)
    law.save(cached_law_path(throughput.cache_dir, key))
    print_law(console, law)
    if law.early and not law.early_left_out:
        advise_past_early_regime(scan, console)
    console.print(f"done in {time.perf_counter() - started:.0f}s: {scan.out / 'law.json'}; `flopwise plan` and "
                  "`flopwise train --auto` now use this law for this data, recipe and device", highlight=False)
    return 0


def check_scan_folder(args: argparse.Namespace) -> Path:
    """The folder this scan writes (a new one) or extends (a finished scan), refused in one line if it
    cannot be."""
    from flopwise.scaling.fitting import SCAN_FILE

    if args.extend:
        folder = args.extend
        if args.out:
            raise FlopwiseError(f"--extend adds to the scan in '{folder}': drop --out")
        if not (folder / SCAN_FILE).is_file() or not (folder / LAW_FILE).is_file():
            raise FlopwiseError(f"--extend '{folder}': no finished scan there (scan.json and law.json); give the "
                                "--out folder of a finished `flopwise scan`")
        return folder
    out = args.out or Path("scans") / time.strftime("%Y%m%d-%H%M%S")
    check_output("--out", out, folder=True)
    if (out / SCAN_FILE).exists():
        raise FlopwiseError(f"'{out}' already holds a scan: choose another --out, or add to it with --extend")
    return out


def reopen_scan(args: argparse.Namespace, config: RunConfig, key: str, decay_start: float, seconds: float,
                console: Console) -> Scan:
    """The finished scan ``--extend`` names (checked by ``check_scan_folder``), checked to be of this setup."""
    from flopwise.plan.scan import Scan

    folder = args.extend
    if read_law(folder).key != key:
        raise FlopwiseError(f"--extend '{folder}': that scan was run with other data, recipe or device; give the "
                            "setup flags (--data, --config, --set, ...) it was run with")
    scan = Scan.reopen(config, folder, decay_start, seconds, console)
    console.print(f"extending scan {folder}: lengths twice its longest ({scan.design.lengths()[-1]:.0f}s) and on, "
                  f"while {seconds:.0f}s last", highlight=False)
    return scan


def advise_past_early_regime(scan: Scan, console: Console) -> None:
    """What would pilot past the early regime: a longer scan of these sizes, or one more length of this one."""
    from flopwise.plan.scan import scan_seconds_past_early_regime, scan_wall_seconds

    design = scan.design
    needed = scan_seconds_past_early_regime(scan.records, design.decay_start)
    extension = design.extension_seconds()
    this_design = scan_wall_seconds(design.unit_seconds, len(design.sizes), design.decay_start)
    fresh = (f"a scan of these sizes needs at least {format_amount('seconds', needed)} "
             f"(`flopwise scan --budget {math.ceil(needed / 60)}m`), or " if needed and needed > this_design else "")
    console.print(f"[yellow]to pilot past the early regime on this device: {fresh}add a length twice the longest to "
                  f"this one (`flopwise scan --extend {scan.out} --budget {math.ceil(extension / 60)}m`)[/yellow]",
                  highlight=False)
