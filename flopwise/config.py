"""The typed run configuration: TOML/YAML files, ``--set key=value`` overrides, clear errors.

Each component owns its section (model, data, budget, optimizer and schedule in their packages; each
method its ``[methods.<name>]``); this module composes them with the loop's own sections.  Every field
has a default, so ``flopwise train --budget 3m`` needs no file.  The resolved configuration is frozen,
written to the run folder as ``config.toml`` and is all a resume needs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from flopwise.budget import BudgetSection, parse_bytes
from flopwise.data.config import DataSection
from flopwise.errors import FlopwiseError
from flopwise.model.section import ModelSection
from flopwise.optim.config import OptimSection, ScheduleSection
from flopwise.rundir import CONFIG_FILE, require_run_dir
from flopwise.section import Section, in_range, one_or_many

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class TrainSection(Section):
    """Loop settings.  Fractions are of the budget (p), so they scale with it.  ``forecast_every``: how
    often the final held-out loss is forecast from the curve so far (0: never); ``target_loss``: stop
    the run once the forecast's low end lies above it; ``law``: the law.json that ``--auto`` plans with
    and whose decay factor the forecast uses (default: the one `flopwise scan` fitted for this setup,
    else the prior); ``eval_tasks``: tasks scored at each evaluation mark (as ``flopwise eval --tasks`` names
    them), on their first ``task_examples`` examples each."""

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
    eval_tasks: list[str] = []
    task_examples: int = 200

    _lists = field_validator("log", "eval_tasks", mode="before")(one_or_many)
    _seed = in_range("seed", low=0, high=2**63 - 1, rule="be a whole number in [0, 2**63 - 1]")  # TOML's integers
    _counts = in_range("eval_tokens", "log_every", "keep_checkpoints", "task_examples", low=1)
    _shares = in_range("eval_every", "checkpoint_every", "forecast_every", low=0, high=1)  # 0: never
    _loss = in_range("target_loss", low=0, above=True)


class PostTrainSection(Section):
    """``stage``: pretrain (a `flopwise train` run), sft, dpo or rl (the stages of flopwise/stages/, checked when the
    run is resolved).  ``data``: JSONL files (conversations for sft,
    preference pairs for dpo, tasks for rl); empty: the built-in data from the standard library.  ``pack``: several
    conversations per window, each attending only to itself (sft).  ``beta``: DPO's strength of the pull
    towards the reference.  ``heldout``: the share of each file's records held out (the built-in data is
    held out by package); ``heldout_max``: at most this many held-out records are scored."""

    stage: str = "pretrain"
    data: list[str] = []
    pack: bool = True
    beta: float = 0.1
    heldout: float = 0.05
    heldout_max: int = 256

    _lists = field_validator("data", mode="before")(one_or_many)
    _beta = in_range("beta", low=0, above=True)
    _share = in_range("heldout", low=0, high=1, above=True, below=True)
    _count = in_range("heldout_max", low=1)


class RLSection(Section):
    """``flopwise rl`` (GRPO, flopwise/rl/): ``group`` completions sampled per prompt (at least 2: an advantage is
    relative to its group), each up to ``max_response`` tokens at ``temperature``; advantages are the reward minus
    the group's mean, divided by its std when ``scale``; ``updates`` optimizer steps per batch of rollouts (above
    1 the ratio to the policy that sampled them is clipped at 1 +- ``clip``); ``kl_beta`` > 0 pulls towards the
    starting model (its forwards are metered); ``allocation``: ``refill`` replaces the prompts whose group got one
    reward for all (no signal) by fresh ones, up to ``refill_rounds`` times (gained more than ``uniform``, which
    trains on every prompt as drawn, at equal budget on 3 seeds: bench/RESULTS.md#rl);
    ``reward``: ``module:function`` (or ``file.py:function``) scoring (prompt, completion, record) instead of the
    task's verifier: the user's own code, run only when named."""

    group: int = 8
    max_response: int = 24
    temperature: float = 0.6
    scale: bool = True
    updates: int = 1
    clip: float = 0.2
    kl_beta: float = 0.0
    allocation: Literal["refill", "uniform"] = "refill"
    refill_rounds: int = 2
    reward: str = ""

    _group = in_range("group", low=2, rule="be a whole number >= 2 (an advantage is relative to its group)")
    _counts = in_range("max_response", "updates", low=1)
    _rounds = in_range("refill_rounds", low=0)
    _temperature = in_range("temperature", low=0, above=True)
    _clip = in_range("clip", low=0, high=1, above=True, below=True)
    _kl = in_range("kl_beta", low=0)


class MemorySection(Section):
    """The memory cap ``--memory`` plans for: with ``limit`` set and no memory-saving method in
    ``methods.use``, flopwise picks the set with the least quality cost whose estimated peak fits."""

    limit: float | None = None

    @field_validator("limit", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> Any:
        try:
            return parse_bytes(value) if isinstance(value, str) else value
        except FlopwiseError as err:
            raise ValueError(str(err)) from None

    _limit = in_range("limit", low=0, above=True)


class ArtifactSection(Section):
    """What ``final/`` stores: its weights' ``precision`` (fp32; bf16; int8 with one scale per row; int4 in groups
    of the run's int4 group, methods.qat.group) with the embeddings and norms in bf16 when int.  A size budget
    (``--budget 2m,4MB``) chooses it (flopwise/size.py); set by hand it applies without one."""

    precision: Literal["fp32", "bf16", "int8", "int4"] = "fp32"


def methods_section() -> type[BaseModel]:
    """``[methods]``, assembled from the method registry (flopwise/methods/section.py) on first use: the
    methods import torch, which ``flopwise --help`` should not wait for."""
    from flopwise.methods.section import methods_section as assembled

    return assembled()


class RunConfig(Section):
    """Everything that defines a run, each section validated for its own types and ranges, and the model shape
    where the config decides it.  What the sections resolve to together (the methods, the shape of an imported
    model, the compute dtype) and each method's ``check`` are the resolve stage's (flopwise/resolve.py)."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    budget: BudgetSection = BudgetSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    train: TrainSection = TrainSection()
    memory: MemorySection = MemorySection()
    posttrain: PostTrainSection = PostTrainSection()
    rl: RLSection = RLSection()
    artifact: ArtifactSection = ArtifactSection()
    methods: Any = Field(default_factory=lambda: methods_section()())  # a methods_section() instance

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> Any:
        section = methods_section()
        return value if isinstance(value, section) else section.model_validate(value)

    @model_validator(mode="after")
    def _shape(self) -> RunConfig:
        if self.model.init_from is None:
            self.model.build(vocab_size=1)  # the shape's own rules (n_heads dividing d_model, ...)
        return self

    def replace(self, **values: Any) -> RunConfig:
        """A new config with dotted ``values`` changed (``replace(**{"optim.name": "adamw"})``), validated
        again: how setup resolves a config without ever mutating one.  Keys left at their defaults stay unset,
        so rules about what the user set (``--init-from`` fixes the shape) still read the user's choices."""
        data = self.model_dump(exclude_unset=True)
        for key, value in values.items():
            _set_dotted(data, key, value)
        return validate_config(data, "resolved")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                values: dict[str, Any] | None = None, base: dict[str, Any] | None = None,
                methods: Iterable[str] = ()) -> RunConfig:
    """Start from ``base`` (a recipe's dotted keys), apply a TOML/YAML file, then ``values`` (dotted
    keys from CLI flags) and ``methods`` (added to ``methods.use``), then ``--set key=value`` overrides,
    and validate the result."""
    data: dict = {}
    for key, value in (base or {}).items():
        _set_dotted(data, key, value)
    if path is not None:
        _merge(data, read_config_file(Path(path)))
    source = str(path) if path is not None else "defaults"
    for key, value in (values or {}).items():
        _set_dotted(data, key, value)
    methods = list(methods)
    if methods:
        section = data.setdefault("methods", {})
        section["use"] = [*one_or_many(RunConfig, section.get("use", [])), *methods]
    for item in overrides:
        _set_dotted(data, *_split_override(item))
    if overrides:
        source += " with --set"
    return validate_config(data, source)


def load_run_config(run_dir: Path) -> RunConfig:
    """A run folder's ``config.toml``; one written before the methods had their own sections is upgraded
    to today's keys (``memory.galore_rank`` -> ``methods.galore.rank``, ...), so older runs still evaluate,
    sample and export."""
    require_run_dir(run_dir)
    path = run_dir / CONFIG_FILE
    return validate_config(keep_defaults_it_ran_with(upgrade_legacy_keys(read_config_file(path))), str(path))


# Keys whose default changed after runs were written without them: such a run keeps the value it trained with,
# so that its resume continues exactly (Polar Express's coefficients became the default in issue 37).
DEFAULTS_BEFORE_THE_KEY = {"optim.ns_coefficients": "newton_schulz"}


def keep_defaults_it_ran_with(data: dict) -> dict:
    """``data`` (a run's saved config) with each key of DEFAULTS_BEFORE_THE_KEY that its section lacks set to the
    value every run had before the key existed."""
    for dotted, value in DEFAULTS_BEFORE_THE_KEY.items():
        section, key = dotted.split(".")
        if isinstance(data.get(section), dict) and key not in data[section]:
            data[section] = {**data[section], key: value}
    return data


def _merge(data: dict, entries: dict) -> None:
    """Merge a file's tables into ``data``, section by section (nested ones too)."""
    for key, value in entries.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _merge(data[key], value)
        else:
            data[key] = value


def read_config_file(path: Path) -> dict:
    if path.is_dir():
        raise FlopwiseError(f"config file '{path}' is a folder: give the path of a .toml or .yaml file")
    if not path.is_file():
        raise FlopwiseError(f"config file '{path}' does not exist: give the path of a .toml or .yaml file")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise FlopwiseError(f"config file '{path}' must end in .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else (yaml.safe_load(text) or {})
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as err:
        first_line = str(err).splitlines()[0]
        raise FlopwiseError(f"config file '{path}' is not valid {path.suffix[1:].upper()}: {first_line}") from None
    if not isinstance(data, dict):
        raise FlopwiseError(f"config file '{path}' holds a {type(data).__name__}, not a table of sections: write "
                            "sections such as [model] or model: with their keys")
    return data


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
        from flopwise.methods.section import legacy_keys

        moves = legacy_keys()
        if key in moves:
            return f"config ({source}): '{key}' is now '{moves[key]}': rename it"
        moved = [old for old in moves if old.startswith(f"{key}.")]
        if moved:
            return (f"config ({source}): section '{key}' moved under [methods] (e.g. '{moved[0]}' is now "
                    f"'{moves[moved[0]]}'): rename its keys")
        section = _section_model(first["loc"][:-1])
        valid = ", ".join(section.model_fields)
        return f"config ({source}): unknown key '{key}': valid keys here are {valid}"
    message = first["msg"].removeprefix("Value error, ")
    return f"config ({source}): {key}={first.get('input')!r}: {message}"


def _section_model(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        model = methods_section() if (model, part) == (RunConfig, "methods") else model.model_fields[part].annotation
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
    """Serialize the resolved config as TOML: a table per section, nested sections as ``[a.b]`` tables,
    dict fields as inline tables; None is omitted."""
    lines: list[str] = []
    _toml_table(config, "", lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_table(section: BaseModel, name: str, lines: list[str]) -> None:
    values = {key: getattr(section, key) for key in type(section).model_fields}
    scalars = {key: value for key, value in values.items() if not isinstance(value, BaseModel) and value is not None}
    if name:
        lines.extend(["", f"[{name}]"])
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in scalars.items())
    for key, value in values.items():
        if isinstance(value, BaseModel):
            _toml_table(value, f"{name}.{key}" if name else key, lines)


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


def upgrade_legacy_keys(data: dict) -> dict:
    """``data`` with the keys older config.toml files used (flopwise/methods/section.py's ``legacy_keys``) moved
    to their new places; an old switch that was on adds its method to ``methods.use``, and the settings of
    methods that were off are dropped."""
    from flopwise.methods.section import legacy_keys, legacy_switches

    moves = legacy_keys()
    data = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    sections = dict.fromkeys(key.split(".")[0] for key in moves)
    old = {f"{section}.{key}": data[section].pop(key) for section in sections if isinstance(data.get(section), dict)
           for key in list(data[section]) if f"{section}.{key}" in moves}
    for section in sections:
        if section not in RunConfig.model_fields and section in data and not data[section]:
            del data[section]  # a section that no longer exists, emptied
    if not old:
        return data
    use = list(old.pop("memory.methods", []))
    use += [name for key, (name, off) in legacy_switches().items() if key in old and old[key] != off]
    _set_dotted(data, "methods.use", use)
    for key, value in old.items():
        target = moves[key]
        if target.split(".")[1] in use:  # settings of methods that were off are dropped
            _set_dotted(data, target, value)
    return data
