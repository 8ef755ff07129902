"""Every numeric config key has a range: a value outside it is refused in one line that names the dotted key,
the value and the range, and the value at the edge of the range is accepted."""

import functools

import pytest
import yaml

from flopwise.cli import main
from flopwise.config import load_config
from flopwise.errors import FlopwiseError

# (key, a value outside its range, the valid value at (or nearest) the edge of that range)
RANGES = [
    # train
    ("train.seed", "-1", "0"), ("train.seed", str(2**63), str(2**63 - 1)), ("train.seed", "true", "0"),
    ("train.eval_every", "-0.1", "0"), ("train.eval_every", "1.5", "1"),
    ("train.eval_tokens", "0", "1"), ("train.log_every", "0", "1"), ("train.log_every", "2.5", "1"),
    ("train.checkpoint_every", "1.01", "1"), ("train.checkpoint_every", "-0.01", "0"),
    ("train.keep_checkpoints", "0", "1"), ("train.forecast_every", ".nan", "0"),
    ("train.forecast_every", "2", "1"), ("train.target_loss", "0", "1e-9"), ("train.target_loss", ".inf", "20"),
    # memory
    ("memory.limit", "0", "1"), ("memory.limit", "0GiB", "1MiB"), ("memory.limit", "-5", "8GiB"),
    # budget
    ("budget.seconds", "0", "1"), ("budget.seconds", "0s", "1s"), ("budget.flops", "-1", "1"),
    ("budget.tokens", ".inf", "1"), ("budget.steps", "0", "1"), ("budget.steps", ".nan", "1"),
    # optim
    ("optim.lr", "-1", "1e-12"), ("optim.lr", "0", "1e-12"), ("optim.lr", ".inf", "1"), ("optim.lr", "true", "1"),
    ("optim.muon_lr", "0", "1e-12"), ("optim.eps", "0", "1e-30"), ("optim.beta1", "1", "0"),
    ("optim.beta2", "-0.1", "0.999"), ("optim.muon_momentum", "1.0", "0"), ("optim.weight_decay", "-0.1", "0"),
    ("optim.weight_decay", ".inf", "0"), ("optim.grad_clip", "-1", "0"), ("optim.batch_size", "0", "1"),
    ("optim.batch_size", "2.5", "1"), ("optim.grad_accum", "0", "1"),
    # schedule
    ("schedule.warmup", "-0.1", "0"), ("schedule.decay", "1.5", "0"), ("schedule.final_lr_frac", "1.5", "1"),
    # data (and its hygiene settings)
    ("data.val_fraction", "0", "0.001"), ("data.val_fraction", "0.5", "0.49"), ("data.vocab_size", "257", "258"),
    ("data.tokenizer_sample_mb", "0", "0.001"), ("data.near_threshold", "0", "1"), ("data.num_perm", "2", "4"),
    ("data.shingle_words", "0", "1"), ("data.min_chars", "-1", "0"), ("data.max_symbol_ratio", "1.5", "1"),
    ("data.max_line_chars", "-1", "0"), ("data.max_duplicate_line_share", "-0.1", "0"),
    # model (the smallest sizes within the shape's own rules: see EDGE_CONTEXT)
    ("model.d_model", "0", "2"), ("model.n_layers", "-1", "1"), ("model.n_heads", "0", "1"),
    ("model.n_kv_heads", "0", "1"), ("model.seq_len", "0", "1"), ("model.mlp_hidden", "0", "1"),
    ("model.rope_theta", "-1", "1e-6"), ("model.rope_theta", ".nan", "10000"),
    # posttrain
    ("posttrain.beta", "0", "1e-6"), ("posttrain.heldout", "0", "1e-6"), ("posttrain.heldout", "1", "0.99"),
    ("posttrain.heldout_max", "0", "1"),
    # rl
    ("rl.group", "1", "2"), ("rl.max_response", "0", "1"), ("rl.updates", "0", "1"), ("rl.refill_rounds", "-1", "0"),
    ("rl.temperature", "0", "1e-6"), ("rl.clip", "0", "1e-6"), ("rl.clip", "1", "0.99"), ("rl.kl_beta", "-1", "0"),
    # methods.<name>
    ("methods.8bit.block", "0", "1"),
    ("methods.galore.rank", "0", "1"), ("methods.galore.update_gap", "0", "1"), ("methods.galore.scale", "0", "1e-6"),
    ("methods.sltrain.rank", "0", "1"), ("methods.sltrain.delta", "0", "0.001"),
    ("methods.sltrain.delta", "1", "0.999"), ("methods.sltrain.alpha", "-1", "1e-6"),
    ("methods.sltrain.refactor_every", "0", "1"), ("methods.sltrain.rewarmup", "-1", "0"),
    ("methods.lisa.layers", "0", "1"), ("methods.lisa.interval", "0", "1"),
    ("methods.lora.rank", "0", "1"), ("methods.lora.alpha", "0", "1e-6"),
    ("methods.mixture.weights", "{a: -1}", "{a: 0, b: 1}"), ("methods.mixture.weights", "{a: .nan}", "{a: 1}"),
    ("methods.online_mixture.eta", ".inf", "0"), ("methods.online_mixture.smoothing", "1", "0"),
    ("methods.curriculum.start", "0", "1"), ("methods.curriculum.full_at", "1.5", "1"),
    ("methods.reweight.temperature", "0", "1e-3"), ("methods.reweight.delta", "-1", "1e-3"),
    ("methods.reweight.burn_in", "1", "0"),
    ("methods.salt.kd_weight", "1.5", "1"), ("methods.salt.kd_until", "-0.1", "0"),
    ("methods.salt.temperature", "0", "1e-3"), ("methods.salt.select_pool", "0.99", "1"),
    ("methods.salt.select_top_k", "0", "1"),
    ("methods.distill.weight", "1.5", "1"), ("methods.distill.weight_end", "-0.1", "0"),
    ("methods.distill.temperature", "0", "1e-3"),
    ("methods.z_loss.weight", "-1", "1e-12"),
    ("methods.qat.start", "1", "0"), ("methods.qat.group", "0", "1"),
    ("methods.prune.sparsity", "-0.1", "0"), ("methods.prune.sparsity", "1", "0.99"),
    ("methods.prune.start", "-0.1", "0"), ("methods.prune.end", "1.5", "1"), ("methods.prune.updates", "0", "1"),
    ("methods.prune_width.heads", "0", "1"), ("methods.prune_width.mlp", "1.5", "1"),
    ("methods.prune_width.calibration", "0", "1"),
    ("methods.grow_depth.factor", "1", "2"), ("methods.grow_depth.at", "0", "0.01"),
    ("methods.grow_depth.at", "1", "0.99"),
    ("methods.seq_schedule.start", "0", "1"), ("methods.seq_schedule.until", "0", "1"),
    ("methods.batch_schedule.start", "1.5", "1"), ("methods.batch_schedule.until", "0", "0.01"),
    ("methods.weight_average.start", "1", "0"), ("methods.weight_average.half_life", "0", "1e-6"),
]
# Sections whose only keys are choices (refused with the choices named: tests/test_fp8.py,
# tests/test_bf16_weights.py, tests/test_size_budget.py), so they have no range.
CHOICES_ONLY = {"methods.fp8", "methods.bf16_weights", "artifact"}
# Other keys an edge value needs to be valid as a whole (a d_model of 2 has room for one head only).
EDGE_CONTEXT = {"model.d_model": ["model.n_heads=1"]}


def _refusal(override: str) -> str:
    with pytest.raises(FlopwiseError) as error:
        load_config(None, [override])
    return str(error.value)


@pytest.mark.parametrize("key, bad, edge", RANGES)
def test_out_of_range_is_refused_in_one_line_and_the_edge_accepted(key, bad, edge):
    message = _refusal(f"{key}={bad}")
    assert f"{key}=" in message and "must" in message and "\n" not in message
    config = load_config(None, [*EDGE_CONTEXT.get(key, []), f"{key}={edge}"])
    value = functools.reduce(getattr, key.split("."), config)
    expected = yaml.safe_load(edge)
    if isinstance(expected, (int, float, dict)):  # strings with units ('1s', '8GiB') are converted
        assert value == expected


def test_every_section_and_method_section_has_a_case():
    from flopwise.config import RunConfig, methods_section

    covered = {key.rsplit(".", 1)[0] for key, _, _ in RANGES}
    sections = {name for name in RunConfig.model_fields if name != "methods"}
    methods = {f"methods.{name}" for name, field in methods_section().model_fields.items()
               if name not in ("use", "progressive") and field.annotation.model_fields}  # checkpointing: no keys
    assert sections | methods <= covered | CHOICES_ONLY


@pytest.mark.parametrize("override, range_text", [
    ("optim.beta1=1.5", "must lie in [0, 1)"), ("optim.batch_size=0", "must be a whole number >= 1"),
    ("optim.lr=-1", "must be positive (a finite number > 0)"), ("train.eval_every=2", "must lie in [0, 1]"),
    ("model.seq_len=0", "must be a whole number >= 1"), ("data.val_fraction=0.5", "must lie in (0, 0.5)"),
    ("methods.sltrain.delta=1.5", "must lie in (0, 1)"),
])
def test_the_refusal_states_the_range(override, range_text):
    key, value = override.split("=")
    assert _refusal(override) == f"config (defaults with --set): {key}={yaml.safe_load(value)!r}: {range_text}"


def test_wsd_warmup_and_decay_fit_the_budget_at_validation():
    message = _refusal("schedule.warmup=0.9")  # with the default decay 0.2
    assert message.startswith("schedule.warmup + schedule.decay = 1.1 exceeds 1") and "\n" not in message
    assert load_config(None, ["schedule.warmup=0.8"]).schedule.warmup == 0.8
    assert load_config(None, ["schedule.name=cosine", "schedule.warmup=0.9"]).schedule.warmup == 0.9

def test_the_cli_refuses_in_one_line_with_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--budget", "3steps", "--set", "optim.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lr=-1" in err and "must be positive" in err
    assert not any(tmp_path.iterdir())  # refused before anything was written
