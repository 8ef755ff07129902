"""The remote-code export: a model that no transformers class computes (GPT-2's pieces: learned positions,
LayerNorm, GELU, biases; ReLU² on RoPE; the speedrun options) is saved with flopwise's own modeling code, which
transformers loads with trust_remote_code=True where flopwise is not installed, with flopwise's logits, greedy
generations and loss, and on which lm-eval's ``hf`` model scores as flopwise does; flopwise reads the folder
back; a stock model's folder stays a stock one."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from flopwise.cli import main
from flopwise.config import load_config
from flopwise.data.tokenizer import byte_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.model.artifact import folder_bytes
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.model.hf import model_config_from_hf, read_hf_config, save_hf_folder
from flopwise.model.remote import source_files
from flopwise.model.section import ModelSection
from flopwise.recipes import recipe_values
from tests.helpers import TINY, load_hf_model

GPT2_PIECES = {"positions": "learned", "norm": "layer", "mlp": "gelu", "bias": True}
SPEEDRUN = {"qk_norm": True, "value_embeds": True, "x0_lambdas": True, "unet_skips": True, "smear": True,
            "logit_softcap": 15.0, "bigram_hash": 64}
SHAPES = {"gpt2": dict(GPT2_PIECES, tie_embeddings=False),
          "relu2-rope": {"mlp": "relu2", "qk_norm": True, "n_kv_heads": 2, "head_size": 16}, "speedrun": SPEEDRUN}
HAS_SPEEDRUN_OPTIONS = set(SPEEDRUN) <= {field.name for field in fields(ModelConfig)}
SHAPE_NAMES = [pytest.param(name, marks=pytest.mark.skipif(
    name == "speedrun" and not HAS_SPEEDRUN_OPTIONS, reason="the speedrun options are not in ModelConfig yet"))
    for name in SHAPES]
TEXT = "def greet(name):\n    return f'Hello, {name}!'  # The quick brown fox."

# Run in a fresh interpreter where importing flopwise fails (it is installed here, so it is blocked), with
# transformers' module cache in the test's folder: what the exported folder needs is only in the folder.
WITHOUT_FLOPWISE = '''
import json, sys

class NoFlopwise:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "flopwise":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoFlopwise())
job = json.loads(open(sys.argv[1]).read())
result = {}
if job["mode"] == "model":
    import torch, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(job["folder"], trust_remote_code=True).eval()
    ids = torch.tensor([job["ids"]])
    with torch.no_grad():
        result["class"] = type(model).__name__
        result["logits"] = model(ids).logits[0].tolist()
        result["loss"] = model(ids, labels=ids).loss.item()
        prompt = ids[:, :job["prompt"]]
        for use_cache in (True, False):
            out = model.generate(prompt, max_new_tokens=job["new"], min_new_tokens=job["new"], do_sample=False,
                                 use_cache=use_cache, pad_token_id=0)
            result[f"greedy_cache_{use_cache}"] = out[0].tolist()
            out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=3,
                                 num_return_sequences=3, use_cache=use_cache, pad_token_id=0,
                                 return_dict_in_generate=True, output_scores=True)  # it reorders the cache's rows
            result[f"beams_cache_{use_cache}"] = [out.sequences.tolist(), out.sequences_scores.tolist()]
        # one row padded on the left, one on the right, beside the unpadded ids
        short = job["ids"][:job["prompt"]]
        pad = len(job["ids"]) - len(short)
        rows = torch.tensor([[0] * pad + short, short + [0] * pad])
        mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(short) + [0] * pad])
        padded = model(rows, attention_mask=mask).logits
        result["left_padded"], result["right_padded"] = padded[0, pad:].tolist(), padded[1, :len(short)].tolist()
        try:
            model.generate(rows, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        except ValueError as error:
            result["padded_with_cache"] = str(error)
else:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=job["folder"], trust_remote_code=True, dtype="float32", device="cpu")
    requests = [Instance("loglikelihood", {}, tuple(pair), i) for i, pair in enumerate(job["requests"])]
    result["loglikelihoods"] = [list(r) for r in lm.loglikelihood(requests)]
result["flopwise_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "flopwise")
print(json.dumps(result))
'''


def without_flopwise(tmp_path: Path, **job) -> dict:
    """``WITHOUT_FLOPWISE``'s result for ``job``, asserting that no flopwise module was imported."""
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "script.py").write_text(WITHOUT_FLOPWISE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path / "job.json")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result.pop("flopwise_imported") == []
    return result


def perturbed_model(shape: dict) -> GPT:
    """A random model with every weight moved off its initial value (norm gains off 1, biases, the options' gates
    and tables off 0), so that a mix-up of any of them shows."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=4, seq_len=64, **shape))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


# ---------------------------------------------------------------- what the folder holds


def test_the_exported_modules_import_only_torch_transformers_the_standard_library_and_each_other():
    """What transformers checks before it loads remote code (imports inside ``try`` it skips, as config.py's of
    flopwise.errors)."""
    names = {path.name for path in source_files()}
    assert {"modeling_flopwise.py", "configuration_flopwise.py", "gpt.py", "config.py"} <= names
    allowed = {"torch", "transformers", *sys.stdlib_module_names}
    for path in source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_try = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in in_try:
                continue
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                continue
            assert set(tops) <= allowed, f"{path.name}:{node.lineno} imports {tops}"


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_a_model_without_a_stock_architecture_is_exported_with_the_code_that_trained_it(tmp_path, name):
    model = perturbed_model(SHAPES[name])
    kind = save_hf_folder(model, byte_tokenizer(), tmp_path / "hf")
    assert kind.remote_code and kind.architecture == "FlopwiseForCausalLM"
    folder = tmp_path / "hf"
    for path in source_files():  # the same files, byte for byte: no second copy of the model to drift
        assert (folder / path.name).read_bytes() == path.read_bytes()
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_flopwise.FlopwiseConfig",
                                  "AutoModelForCausalLM": "modeling_flopwise.FlopwiseForCausalLM"}
    assert config["model_type"] == "flopwise" and config["flopwise"] == model.config.to_dict()
    assert config["max_position_embeddings"] == 64
    assert_readme(folder, "remote code (FlopwiseForCausalLM): load with "
                  "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True), and AutoTokenizer's likewise")
    weights = load_file(str(folder / "model.safetensors"))
    assert weights.keys() == {f"model.{k}" for k in model.state_dict()}
    # and flopwise reads it back (--init-from, a teacher): the same shape at its context, the same weights
    reloaded = load_hf_model(folder, seq_len=64)
    assert reloaded.config == model.config
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


def assert_readme(folder: Path, line: str) -> None:
    """final/README.md says what the folder is, how to load it, and its bytes (README.md's own included)."""
    assert (folder / "README.md").read_text() == (
        f"flopwise model, {line}; weights stored in fp32; the folder holds {folder_bytes(folder):,} bytes\n")


@pytest.mark.parametrize("shape,architecture", [({}, "LlamaForCausalLM"), ({"qk_norm": True}, "Qwen3ForCausalLM")])
def test_a_stock_model_is_exported_without_remote_code(tmp_path, shape, architecture):
    kind = save_hf_folder(perturbed_model(shape), byte_tokenizer(), tmp_path / "hf")
    assert (kind.architecture, kind.remote_code) == (architecture, False)
    assert not list((tmp_path / "hf").glob("*.py"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture] and "auto_map" not in config
    assert_readme(tmp_path / "hf", f"stock {architecture}: AutoModelForCausalLM.from_pretrained(folder) loads it "
                  "without remote code")


def test_rope_models_read_back_at_the_asked_context_and_learned_positions_at_their_own(tmp_path):
    save_hf_folder(perturbed_model(SHAPES["relu2-rope"]), byte_tokenizer(), tmp_path / "rope")
    save_hf_folder(perturbed_model(SHAPES["gpt2"]), byte_tokenizer(), tmp_path / "learned")
    rope = model_config_from_hf(read_hf_config(tmp_path / "rope"), tmp_path / "rope", 32)
    assert (rope.seq_len, rope.context, rope.mlp) == (32, 64, "relu2")
    learned = model_config_from_hf(read_hf_config(tmp_path / "learned"), tmp_path / "learned", 32)
    assert (learned.seq_len, learned.context) == (64, 64)


@pytest.mark.parametrize("change,message", [
    ({"flopwise": None}, "model_type is 'flopwise' but there is no 'flopwise' shape in it: export the model "
                         "again with flopwise"),
    ({"flopwise": {"vocab_size": 257, "n_expert": 8}}, "unknown model config key(s) n_expert: valid keys are"),
    ({"flopwise": {"vocab_size": 257, "d_model": 60, "n_heads": 7}}, "model.n_heads=7 does not divide "
                                                                     "model.d_model=60"),
])
def test_a_damaged_remote_code_config_is_refused_in_one_line(tmp_path, change, message):
    save_hf_folder(perturbed_model(SHAPES["gpt2"]), byte_tokenizer(), tmp_path / "hf")
    config = dict(json.loads((tmp_path / "hf" / "config.json").read_text()), **change)
    with pytest.raises(FlopwiseError) as error:
        model_config_from_hf(config, tmp_path / "hf", 64)
    assert str(error.value).startswith(f"{tmp_path / 'hf' / 'config.json'}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def other_values(default: Any, annotation: Any) -> list[Any]:
    """Values of a model key besides its default, to probe what it changes: the other boolean, the other choices,
    a larger number."""
    if isinstance(default, bool):
        return [not default]
    if get_origin(annotation) is Literal:
        return [value for value in get_args(annotation) if value != default]
    if isinstance(default, (int, float)):
        return [default + 2]
    return []


def test_the_stock_recipe_turns_off_every_model_key_that_would_need_remote_code():
    """Probed key by key, so that a new model option is covered (or this fails, naming it)."""
    needs_remote_code = set()
    for name, field in ModelSection.model_fields.items():
        for value in other_values(field.default, field.annotation):
            try:
                shape = ModelSection(**{name: value}).build(257)
            except (ValueError, FlopwiseError):  # a value the key refuses on its own
                continue
            if not shape.stock_architecture:
                needs_remote_code.add(f"model.{name}")
    assert {"model.positions", "model.norm", "model.mlp", "model.bias"} <= needs_remote_code
    stock = recipe_values("stock")
    assert needs_remote_code <= set(stock)
    assert load_config(base=stock).model.build(257).stock_architecture
    assert {k: v for k, v in stock.items() if k not in needs_remote_code} == recipe_values("default")


# ---------------------------------------------------------------- in transformers, without flopwise


@pytest.mark.slow
@pytest.mark.parametrize("name,weights", [*[pytest.param(p.values[0], torch.float32, marks=p.marks, id=p.values[0])
                                            for p in SHAPE_NAMES],
                                          pytest.param("gpt2", torch.bfloat16, id="gpt2-bf16-weights")])
def test_transformers_computes_the_remote_code_export_as_flopwise_does_without_flopwise(tmp_path, name, weights):
    model = perturbed_model(SHAPES[name])
    model.store_matrices_in(weights)  # bf16: as a run with bf16 weights keeps and exports them
    save_hf_folder(model, byte_tokenizer(), tmp_path / "hf")
    ids = byte_tokenizer().encode_batch([TEXT])[0][:48]
    prompt, new = 8, 40  # to the end of the 48-token context
    theirs = without_flopwise(tmp_path, mode="model", folder=str(tmp_path / "hf"), ids=ids, prompt=prompt, new=new)
    assert theirs["class"] == "FlopwiseForCausalLM"
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x)[0][0]
        short = model(x[:, :prompt])[0][0]
    assert (torch.tensor(theirs["logits"]) - logits).abs().max().item() < 1e-5
    loss = F.cross_entropy(logits[:-1], x[0, 1:]).item()  # transformers shifts the labels inside
    assert theirs["loss"] == pytest.approx(loss, abs=1e-5)
    greedy = model.generate(x[:, :prompt], new, temperature=0)[0].tolist()  # flopwise sample at temperature 0
    assert theirs["greedy_cache_True"] == greedy == theirs["greedy_cache_False"]
    (cached, cached_scores), (recomputed, recomputed_scores) = theirs["beams_cache_True"], theirs["beams_cache_False"]
    assert cached == recomputed and cached_scores == pytest.approx(recomputed_scores, abs=1e-5)
    for side in ("left_padded", "right_padded"):  # padding is a sequence of its own
        assert (torch.tensor(theirs[side]) - short).abs().max().item() < 1e-5
    assert theirs["padded_with_cache"] == ("FlopwiseForCausalLM: a padded batch (attention_mask with zeros) cannot "
                                           "use the key/value cache: pass use_cache=False, or one sequence at a time")


@pytest.fixture(scope="module")
def remote_run(tmp_path_factory, text_folder) -> tuple[Path, str]:
    """A real run with GPT-2's pieces (the baseline recipe's model), and what its command printed."""
    run = tmp_path_factory.mktemp("remote") / "run"
    sets = [flag for key, value in GPT2_PIECES.items() for flag in ("--set", f"model.{key}={str(value).lower()}")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "--data", str(text_folder), "--budget", "12steps", "--out", str(run), *TINY, *sets,
                     "--set", "train.precision=fp32"]) == 0
    return run, printed.getvalue()


@pytest.mark.slow
def test_a_run_says_that_its_model_needs_remote_code(remote_run, tmp_path, capsys):
    run, printed = remote_run
    line = ("remote code (FlopwiseForCausalLM): load with AutoModelForCausalLM.from_pretrained(folder, "
            "trust_remote_code=True), and AutoTokenizer's likewise")
    assert f"final/: {line}" in printed
    assert json.loads((run / "plan.json").read_text())["export"] == {"architecture": "FlopwiseForCausalLM",
                                                                     "remote_code": True}
    assert_readme(run / "final", line)
    assert main(["export", str(run), "--to", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == f"written: {tmp_path / 'out'}: {line}\n"
    for name in os.listdir(run / "final"):  # `flopwise export` writes the run's final/ folder again
        assert (tmp_path / "out" / name).read_bytes() == (run / "final" / name).read_bytes(), name


@pytest.mark.slow
def test_lm_eval_hf_model_scores_the_remote_code_export_as_flopwise_does(remote_run, tmp_path):
    from lm_eval.api.instance import Instance

    from flopwise.evaluate.lm_eval_model import FlopwiseLM

    run, _ = remote_run
    pairs = [["The keyword that defines a function is", " def"], ["A loop that repeats is a", " while loop"],
             ["", "import"], [TEXT, " Hello"]]
    theirs = without_flopwise(tmp_path, mode="lm_eval", folder=str(run / "final"), requests=pairs)["loglikelihoods"]
    ours = FlopwiseLM(run=str(run), device="cpu").loglikelihood(
        [Instance("loglikelihood", {}, tuple(pair), i) for i, pair in enumerate(pairs)])
    assert len(theirs) == len(ours) == len(pairs)
    for (their_ll, their_greedy), (our_ll, our_greedy) in zip(theirs, ours):
        assert their_ll == pytest.approx(our_ll, abs=1e-4) and their_greedy == our_greedy


@pytest.mark.slow
def test_init_from_a_remote_code_folder_continues_its_weights(remote_run, tmp_path, text_folder):
    run, _ = remote_run
    again = tmp_path / "again"  # a near-zero learning rate: the final weights must be the imported ones
    assert main(["train", "--init-from", str(run / "final"), "--data", str(text_folder), "--budget", "2steps",
                 "--out", str(again), "--set", "model.seq_len=64", "--set", "optim.batch_size=2",
                 "--set", "optim.lr=1e-12", "--set", "optim.muon_lr=1e-12", "--set", "train.eval_tokens=512"]) == 0
    before, after = load_file(str(run / "final" / "model.safetensors")), load_file(str(again / "final" /
                                                                                       "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.allclose(before[k], after[k], atol=1e-9) for k in before)
    assert json.loads((again / "plan.json").read_text())["model"]["positions"] == "learned"
