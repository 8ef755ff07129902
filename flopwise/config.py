"""The typed run configuration: TOML/YAML files, ``--set key=value`` overrides, clear errors.

Every field has a default, so ``flopwise train --budget 3m`` needs no file.  The resolved
configuration is written to the run folder as ``config.toml`` and is all a resume needs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from flopwise.budget import LIMITS, Budget, parse_bytes, parse_limit
from flopwise.errors import FlopwiseError
from flopwise.model.config import MLPS, NAMED_SIZES, NORMS, POSITIONS, ModelConfig
from flopwise.optim.schedules import SCHEDULES, Schedule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _one_or_many(cls: type, value: Any) -> Any:
    """A list field given one string (``--set data.sources=./docs``) becomes a list of it."""
    return [value] if isinstance(value, str) else value


def _unit_share(cls: type, value: float) -> float:
    """Shares of the budget or of a mixture: in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError("must lie in [0, 1)")
    return value


def _non_negative_number(cls: type, value: float) -> float:
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _positive(cls: type, value: float | None) -> float | None:
    """Sizes, rates and counts: unset (None, where allowed) or above zero."""
    if value is not None and value <= 0:
        raise ValueError("must be positive")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """Shape of the decoder; a named size gives defaults that explicit fields override.

    ``init_from`` (a Hugging Face model folder or hub id) takes the shape and weights from that
    model instead; only ``seq_len`` (the training context) is then chosen here."""

    size: str = "small"
    init_from: str | None = None
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    seq_len: int | None = None
    mlp_hidden: int | None = None
    qk_norm: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    mlp: Literal[MLPS] = "swiglu"  # type: ignore[valid-type]
    norm: Literal[NORMS] = "rms"  # type: ignore[valid-type]
    positions: Literal[POSITIONS] = "rope"  # type: ignore[valid-type]
    bias: bool = False
    zero_init_out: bool = True

    @field_validator("size")
    @classmethod
    def _known_size(cls, value: str) -> str:
        if value not in NAMED_SIZES:
            raise ValueError(f"unknown size '{value}': choose one of {', '.join(NAMED_SIZES)}")
        return value

    def build(self, vocab_size: int) -> ModelConfig:
        shape = dict(NAMED_SIZES[self.size])
        for key, value in self.model_dump(exclude={"size", "init_from"}).items():
            if value is not None:
                shape[key] = value
        cfg = ModelConfig(vocab_size=vocab_size, **shape)
        cfg.validate()
        return cfg


class DataSection(_Section):
    """Where the text comes from and how it becomes tokens."""

    sources: list[str] = ["stdlib"]
    include: list[str] = []
    jsonl_field: str = "text"
    val_sources: list[str] = []
    val_fraction: float = 0.02
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    tokenizer_sample_mb: float = 4.0
    cache_dir: str | None = None
    dedup: Literal["none", "exact", "near"] = "exact"
    near_threshold: float = 0.8
    min_chars: int = 0
    max_symbol_ratio: float = 1.0
    max_line_chars: int = 0
    max_duplicate_line_share: float = 1.0

    _lists = field_validator("sources", "include", "val_sources", mode="before")(_one_or_many)

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 < value < 0.5:
            raise ValueError("must lie in (0, 0.5)")
        return value


class MixtureSection(_Section):
    """How the domains are sampled.  ``weights``: domain -> share of training tokens (every domain
    named; empty: each in proportion to its tokens); ``--data name=path:weight`` sets them too.
    ``online``: adapt the weights during the run from per-domain training loss ('loss') or from the
    excess over a ``reference`` run's held-out losses ('excess', DoReMi); ``eta`` and ``smoothing``
    are DoReMi's step size and mix toward uniform (flopwise/data/mixture.py)."""

    weights: dict[str, float] = {}
    online: Literal["none", "loss", "excess"] = "none"
    reference: str | None = None
    eta: float = 1.0
    smoothing: float = 1e-3

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        if any(weight < 0 for weight in value.values()) or (value and sum(value.values()) <= 0):
            raise ValueError("weights must be >= 0 with a positive sum")
        return value

    _shares = field_validator("smoothing")(_unit_share)
    _eta = field_validator("eta")(_non_negative_number)


class CurriculumSection(_Section):
    """Easy-to-hard ordering: ``order`` scores each training window by 'rarity' (mean unigram
    surprisal of its tokens, Platanios et al. 2019) or 'teacher' (the loss of the small model in
    ``scorer``); at progress p only the easiest ``pacing`` share of windows is sampled, growing from
    ``start`` to all of them at ``full_at`` (Wu et al. 2021)."""

    order: Literal["none", "rarity", "teacher"] = "none"
    pacing: Literal["linear", "root", "step"] = "linear"
    start: float = 0.1
    full_at: float = 0.5
    scorer: str | None = None


class ReweightSection(_Section):
    """Per-sequence loss reweighting (Sow et al. 2025): ``strategy`` linupper (the paper's choice),
    quadratic or extremes; softmax ``temperature`` r; losses normalized to [-delta, delta] in the
    global batch; uniform weights while p < ``burn_in`` (the paper: its first 1000 steps)."""

    strategy: Literal["none", "linupper", "quadratic", "extremes"] = "none"
    temperature: float = 0.4
    delta: float = 1.0
    burn_in: float = 0.05

    _positives = field_validator("temperature", "delta")(_positive)
    _shares = field_validator("burn_in")(_unit_share)


class SaltSection(_Section):
    """Small-model guidance (SALT, Rawat et al. 2024): ``teacher`` (a finished flopwise run folder or a
    Hugging Face model folder with this run's tokenizer) adds a distillation term to the loss while p <
    ``kd_until``, and with ``select_pool`` > 1 picks each batch from that many times more candidates."""

    teacher: str | None = None
    kd_weight: float = 2 / 3  # defaults and their sources: flopwise/methods/salt.py (SaltSettings)
    kd_until: float = 36_000 / 208_000
    temperature: float = 1.0
    select_pool: float = 1.0


class BudgetSection(_Section):
    """Limits of the run; numbers or strings with units (``seconds = "3m"``)."""

    seconds: float | None = None
    flops: float | None = None
    tokens: float | None = None
    steps: float | None = None

    @field_validator(*LIMITS, mode="before")
    @classmethod
    def _units(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str):
            name, amount = parse_limit(value)
            if name != info.field_name:
                raise ValueError(f"'{value}' is a {name} amount, not {info.field_name}")
            return amount
        return value

    def build(self) -> Budget:
        budget = Budget(**self.model_dump())
        budget.validate()
        return budget


class OptimSection(_Section):
    """AdamW with decoupled weight decay on matrices only; or Muon for the blocks' matrices and that
    AdamW (at ``lr``) for embeddings, head, gains and biases."""

    name: Literal["adamw", "muon"] = "muon"
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    muon_lr: float = 0.05
    muon_momentum: float = 0.95

    _positives = field_validator("lr", "batch_size", "grad_accum", "muon_lr")(_positive)


class ScheduleSection(_Section):
    """Learning-rate multiplier as a function of budget progress p."""

    name: Literal[SCHEDULES] = "wsd"  # type: ignore[valid-type]
    warmup: float = 0.02
    decay: float = 0.2
    final_lr_frac: float = 0.0

    def build(self) -> Schedule:
        return Schedule(**self.model_dump())


class TrainSection(_Section):
    """Loop settings.  Fractions are of the budget (p), so they scale with it.  ``forecast_every``: how
    often the final held-out loss is forecast from the curve so far (0: never); ``target_loss``: stop
    the run once the forecast's low end lies above it; ``law``: the law.json that ``--auto`` plans with
    and whose decay factor the forecast uses (default: the one `flopwise scan` fitted for this setup,
    else the prior)."""

    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    eval_every: float = 0.25
    eval_tokens: int = 16384
    log_every: int = 10
    checkpoint_every: float = 0.1
    keep_checkpoints: int = 2
    cpu_keep_freed_memory: bool = True
    log: list[Literal["tensorboard", "wandb"]] = []
    wandb_project: str = "flopwise"
    parallel: Literal["ddp", "fsdp"] = "ddp"
    forecast_every: float = 0.1
    target_loss: float | None = None
    law: str | None = None

    _lists = field_validator("log", mode="before")(_one_or_many)
    _positives = field_validator("target_loss")(_positive)


def default_rank(rank: int | None, d_model: int) -> int:
    """A method's rank (GaLore, SLTrain): the one set, else d_model // 4, the papers' ratio (512 for
    d_model 2048 in both GaLore's and SLTrain's 1B runs)."""
    return rank or d_model // 4


MEMORY_METHODS = ("8bit", "checkpointing", "layerwise", "galore", "sltrain", "lisa", "lora")


class MemorySection(_Section):
    """Memory-saving methods (composable) and the cap ``--memory`` plans for.

    ``methods``: 8bit (blockwise-quantized optimizer states), checkpointing (recompute each block's
    activations in backward), layerwise (each weight updated during backward, as GaLore's per-layer
    mode: full gradients are never all alive), galore (Zhao et al. 2024), sltrain (Han et al. 2024),
    lisa (Pan et al. 2024), lora (Hu et al. 2021).  With ``limit`` set and no methods given,
    the planner picks the cheapest set that fits.  Ranks left unset are d_model // 4 (the papers'
    ratio: 512 for d_model 2048)."""

    limit: float | None = None
    methods: list[Literal[MEMORY_METHODS]] = []  # type: ignore[valid-type]
    state_block: int = 256
    galore_rank: int | None = None
    galore_update_gap: int = 200
    galore_scale: float = 0.25
    sltrain_rank: int | None = None
    sltrain_delta: float = 0.03
    sltrain_alpha: float = 32.0
    sltrain_refactor_every: int = 200
    sltrain_rewarmup: int = 10
    lisa_layers: int = 2
    lisa_interval: int = 20
    lora_rank: int = 8
    lora_alpha: float = 16.0

    @field_validator("limit", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> Any:
        try:
            return parse_bytes(value) if isinstance(value, str) else value
        except FlopwiseError as err:
            raise ValueError(str(err)) from None

    _lists = field_validator("methods", mode="before")(_one_or_many)

    _positives = field_validator("state_block", "galore_rank", "galore_update_gap", "sltrain_rank",
                                 "sltrain_refactor_every", "lisa_layers", "lisa_interval", "lora_rank")(_positive)

    @field_validator("sltrain_delta")
    @classmethod
    def _density(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError("must lie in (0, 1)")
        return value


class RunConfig(_Section):
    """Everything that defines a run."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    budget: BudgetSection = BudgetSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    train: TrainSection = TrainSection()
    memory: MemorySection = MemorySection()
    mixture: MixtureSection = MixtureSection()
    curriculum: CurriculumSection = CurriculumSection()
    reweight: ReweightSection = ReweightSection()
    salt: SaltSection = SaltSection()


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                values: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> RunConfig:
    """Start from ``base`` (a recipe's dotted keys), apply a TOML/YAML file, then ``values`` (dotted
    keys from CLI flags), then ``--set key=value`` overrides, and validate the result."""
    data: dict = {}
    for key, value in (base or {}).items():
        _set_dotted(data, key, value)
    if path is not None:
        for section, entries in read_config_file(Path(path)).items():
            if isinstance(entries, dict) and isinstance(data.get(section), dict):
                data[section].update(entries)
            else:
                data[section] = entries
    source = str(path) if path is not None else "defaults"
    for key, value in (values or {}).items():
        _set_dotted(data, key, value)
    for item in overrides:
        _set_dotted(data, *_split_override(item))
    if overrides:
        source += " with --set"
    return validate_config(data, source)


def read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise FlopwiseError(f"config file '{path}' does not exist: give the path of a .toml or .yaml file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            return yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        first_line = str(err).splitlines()[0]
        raise FlopwiseError(f"config file '{path}' is not valid {path.suffix[1:].upper()}: {first_line}") from None
    raise FlopwiseError(f"config file '{path}' must end in .toml, .yaml or .yml")


def validate_config(data: dict, source: str) -> RunConfig:
    """Build a RunConfig, turning pydantic's report into one line that names the key."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise FlopwiseError(_one_line(err, source)) from None


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        section = _section_model(first["loc"][:-1])
        valid = ", ".join(section.model_fields)
        return f"config ({source}): unknown key '{key}': valid keys here are {valid}"
    message = first["msg"].removeprefix("Value error, ")
    return f"config ({source}): {key}={first.get('input')!r}: {message}"


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    return model


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise FlopwiseError(f"--set '{item}' must look like section.key=value, e.g. model.d_model=256")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FlopwiseError(f"--set {key}: '{part}' is a value, not a section")
    node[parts[-1]] = value


def config_to_toml(config: RunConfig) -> str:
    """Serialize the resolved config as TOML (sections of scalars and lists; None omitted)."""
    lines: list[str] = []
    for section, values in config.model_dump().items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None)
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(key))} = {_toml_value(item)}" for key, item in value.items()) + "}"
    return json.dumps(str(value))
