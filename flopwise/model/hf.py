"""Hugging Face format, both ways: a flopwise model as a `transformers` folder, and a Llama-family
folder (or flopwise's own export) as a flopwise model.

A LLaMA-style decoder (RMSNorm, RoPE in rotate-half layout, SwiGLU, GQA, no biases) is exactly
``LlamaForCausalLM`` without QK-norm and exactly ``Qwen3ForCausalLM`` with it: a stock architecture,
whose weights only gain a ``model.`` prefix.  Any other model is saved with its own modeling code
(flopwise/model/remote.py).  Everything here reads and writes plain JSON and safetensors, so exporting
needs no ``transformers`` install and loading never unpickles.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flopwise.data.tokenizer import Tokenizer
from flopwise.errors import FlopwiseError
from flopwise.model.artifact import folder_bytes, stored_tensors
from flopwise.model.config import ModelConfig
from flopwise.model.gpt import GPT
from flopwise.model.remote import ARCHITECTURE, MODEL_TYPE, copy_sources, model_config_from_remote, remote_config
from flopwise.model.stored import dequantize_stored

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# model_type -> (architecture, has QK-norm).  Mistral is Llama with an optional sliding window.
ARCHITECTURES = {"llama": ("LlamaForCausalLM", False), "mistral": ("MistralForCausalLM", False),
                 "qwen3": ("Qwen3ForCausalLM", True)}
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.txt"]


@dataclass(frozen=True)
class ExportKind:
    """What a model's Hugging Face folder is: a stock transformers architecture, or flopwise's remote code."""

    architecture: str
    remote_code: bool

    def describe(self) -> str:
        """One line for the user: how the folder loads."""
        if self.remote_code:
            return (f"remote code ({self.architecture}): load with AutoModelForCausalLM.from_pretrained(folder, "
                    "trust_remote_code=True), and AutoTokenizer's likewise")
        return f"stock {self.architecture}: AutoModelForCausalLM.from_pretrained(folder) loads it without remote code"

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "remote_code": self.remote_code}


def export_kind(cfg: ModelConfig, precision: str = "fp32") -> ExportKind:
    """Llama (Qwen3 with QK-norm) for a stock architecture; remote code for any other model, and for weights
    stored as integers (``precision`` int8 or int4), which flopwise's code dequantizes."""
    if not cfg.stock_architecture or precision in ("int8", "int4"):
        return ExportKind(ARCHITECTURE, remote_code=True)
    return ExportKind(ARCHITECTURES["qwen3" if cfg.qk_norm else "llama"][0], remote_code=False)


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` for a stock ``cfg``: Llama without QK-norm, Qwen3 with it; ``dtype``: its weights'
    (``bfloat16`` for a run with bf16 weights), which transformers loads them in by default."""
    model_type = "qwen3" if cfg.qk_norm else "llama"
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type][0]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.context, "rms_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "use_cache": True,
        "torch_dtype": dtype, "dtype": dtype,
    }
    if model_type == "llama":
        config.update(mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                      layer_types=["full_attention"] * cfg.n_layers)
    return config


def model_config_from_hf(config: dict[str, Any], source: Path, seq_len: int) -> ModelConfig:
    """The flopwise shape of a Llama-family ``config.json`` (or of flopwise's own remote-code export); anything
    flopwise cannot compute exactly (biases, scaled RoPE, sliding windows, other activations) is refused by name."""
    model_type = config.get("model_type")
    if model_type == MODEL_TYPE:
        return model_config_from_remote(config, source, seq_len)
    if model_type not in ARCHITECTURES:
        raise FlopwiseError(f"{source / 'config.json'}: model_type '{model_type}' is not supported: flopwise "
                            f"imports {', '.join(ARCHITECTURES)} (Llama-family) models and its own exports")
    unsupported = {
        "attention_bias": bool(config.get("attention_bias")), "mlp_bias": bool(config.get("mlp_bias")),
        "hidden_act": config.get("hidden_act", "silu") != "silu",
        "rope_scaling": _rope_type(config) != "default",
        "sliding_window": bool(config.get("use_sliding_window", model_type == "mistral")
                               and config.get("sliding_window")),
    }
    for key, bad in unsupported.items():
        if bad:
            raise FlopwiseError(f"{source / 'config.json'}: {key}={_config_value(config, key)!r} is not "
                                "supported by flopwise's decoder: import a plain Llama/Qwen3-style model")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    cfg = ModelConfig(
        vocab_size=config["vocab_size"], d_model=hidden, n_layers=config["num_hidden_layers"], n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        head_size=None if head_dim * heads == hidden else head_dim, seq_len=seq_len,
        max_positions=config.get("max_position_embeddings"), mlp_hidden=config["intermediate_size"],
        qk_norm=ARCHITECTURES[model_type][1], tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta=float(_rope_theta(config)), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        init_std=float(config.get("initializer_range", 0.02)))
    cfg.validate()
    return cfg


def _rope_type(config: dict[str, Any]) -> str:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _rope_theta(config: dict[str, Any]) -> float:
    return (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))


def _config_value(config: dict[str, Any], key: str) -> Any:
    return _rope_type(config) if key == "rope_scaling" else config.get(key)


def hf_state_dict(model: GPT, remote_code: bool = False) -> dict[str, torch.Tensor]:
    """flopwise weights under Hugging Face names (the head beside ``model.``, as Llama holds it; every weight under
    ``model.`` with ``remote_code``, as modeling_flopwise.py holds the decoder); a tied head is stored once, as the
    embedding.  Each keeps the dtype it trained in: fp32, or bf16 for the matrices of a run with bf16 weights
    (whose fp32 norm gains stay fp32, so the file holds exactly the model that was evaluated)."""
    return {name if name.startswith("lm_head.") and not remote_code else f"model.{name}": _stored(tensor)
            for name, tensor in model.state_dict().items()}


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    dtype = torch.bfloat16 if tensor.dtype == torch.bfloat16 else torch.float32
    return tensor.detach().to("cpu", dtype).contiguous()


def weights_dtype(model: GPT) -> str:
    """The transformers dtype name of ``model``'s matrices: ``bfloat16`` when stored in bf16, else ``float32``."""
    return "bfloat16" if model.embed_tokens.weight.dtype == torch.bfloat16 else "float32"


def flopwise_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: Path) -> dict[str, torch.Tensor]:
    """Inverse of hf_state_dict; checks that every weight the model needs is there."""
    state = {}
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; recomputed here
            continue
        state[name.removeprefix("model.")] = tensor.float()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store the head too
    with torch.device("meta"):  # names only: no memory, no initialization
        expected = set(GPT(cfg).state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        detail = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
        raise FlopwiseError(f"{source}: weights do not match config.json ({detail}): is the folder complete?")
    return state


def save_hf_folder(model: GPT, tokenizer: Tokenizer, folder: Path, chat_template: str | None = None,
                   end_of_turn: str | None = None, precision: str = "fp32", group: int = 32,
                   cap: float | None = None) -> ExportKind:
    """Write a folder that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load offline: a stock
    architecture's, or one with flopwise's modeling code (``trust_remote_code=True``); its README.md says which.
    ``chat_template``: a Jinja template stored in ``tokenizer_config.json``, where ``apply_chat_template``
    (and llama.cpp's converter) read it; ``end_of_turn``: the token a chat reply ends with, listed among
    the end tokens of ``generation_config.json`` so that ``generate`` stops there.

    ``precision``: what the weights are stored in (artifact.precision, flopwise/size.py): fp32 or bf16 in a stock
    or remote-code folder; int8 or int4 (int4 in groups of ``group`` input columns) always with flopwise's
    remote code, which dequantizes them (flopwise/model/stored.py).  ``cap``: the most bytes the folder may
    hold (a size budget): a larger one is refused, not kept.

    Written under a temporary name and renamed, so an interrupted export leaves no half folder."""
    integer = precision in ("int8", "int4")
    if precision == "bf16":
        model = copy.deepcopy(model).to(torch.bfloat16)
    kind = export_kind(model.config, precision)
    config = (remote_config(model.config, tokenizer.eos_id) if kind.remote_code
              else hf_config(model.config, tokenizer, weights_dtype(model)))
    if integer:
        config["flopwise_storage"] = {"precision": precision, "group": group}
    tensors = stored_tensors(model, precision, group) if integer else hf_state_dict(model, kind.remote_code)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        tokenizer.save(tmp / "tokenizer.json")
        _write_transformers_files(tmp, config, model.config, tokenizer, chat_template, end_of_turn)
        if kind.remote_code:
            copy_sources(tmp)
        _write_readme(tmp, f"flopwise model, {kind.describe()}; weights stored in {precision}", folder_bytes(tmp))
        size = folder_bytes(tmp)
        if cap is not None and size > cap:
            raise FlopwiseError(f"final/ in {precision} holds {size:,} bytes, above the size budget of {cap:,.0f} "
                                "bytes: nothing was written; give a larger cap or a smaller model")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:  # a full disk, an interrupt: no half folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return kind


def _write_readme(tmp: Path, line: str, other_bytes: int) -> None:
    """README.md saying the folder's bytes, its own included (the count's digits settle within a few rounds)."""
    text = ""
    for _ in range(4):
        text = f"{line}; the folder holds {other_bytes + len(text.encode()):,} bytes\n"
    (tmp / "README.md").write_text(text, encoding="utf-8")


def _write_transformers_files(tmp: Path, config: dict[str, Any], cfg: ModelConfig, tokenizer: Tokenizer,
                              chat_template: str | None, end_of_turn: str | None) -> None:
    _write(tmp / "config.json", config)
    ends = [tokenizer.eos_id] + ([tokenizer.encode_batch([end_of_turn])[0][0]] if end_of_turn else [])
    _write(tmp / "generation_config.json", {"bos_token_id": tokenizer.eos_id,
                                            "eos_token_id": ends if len(ends) > 1 else ends[0],
                                            "do_sample": True, "temperature": 0.8, "top_k": 50})
    eos = tokenizer.eos_token
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
                        "unk_token": None, "add_bos_token": False, "model_max_length": cfg.context,
                        "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    _write(tmp / "tokenizer_config.json", tokenizer_config)
    _write(tmp / "special_tokens_map.json", {"eos_token": eos, "bos_token": eos})


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FlopwiseError(f"'{folder}' has no config.json: give a Hugging Face model folder "
                            "(as saved by save_pretrained or downloaded to the hub cache)")
    return json.loads(path.read_text(encoding="utf-8"))


class DamagedWeights(FlopwiseError):
    """A weights file that safetensors cannot read; its reader, who knows where the file came from, may say
    how to get it whole again (the message's own advice suits a downloaded folder)."""

    def __init__(self, path: Path, cause: str) -> None:
        super().__init__(f"'{path}' is damaged ({cause}): copy or download the model folder again")
        self.path, self.cause = path, cause


def load_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single or sharded safetensors checkpoint (never a pickle-based .bin)."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise FlopwiseError(f"'{folder}' has no {WEIGHTS} (or sharded index): flopwise loads only safetensors, never "
                            "pickled .bin files; convert with transformers' save_pretrained(safe_serialization=True)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(folder / file), framework="pt") as handle:
                tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
        except SafetensorError as err:  # its header does not cover the file: truncated, or not safetensors at all
            raise DamagedWeights(folder / file, str(err).removeprefix("Error while deserializing header: ")) from None
    return tensors


def load_weights_into(model: GPT, folder: Path, as_stored: bool = False) -> None:
    """Replace ``model``'s weights with the folder's (HF names, single or sharded safetensors), strictly.
    ``as_stored``: the matrices keep the folder's bf16 where it stores them so (a run trained with bf16
    weights is evaluated as it trained); otherwise the model's own dtype, fp32 (an --init-from import)."""
    tensors = load_hf_weights(folder)
    # a run folder's final/ of older runs holds weights only (its shape is in plan.json)
    storage = read_hf_config(folder).get("flopwise_storage") if (folder / "config.json").is_file() else None
    if storage:  # integer weights (a size budget's int8 or int4): the fp32 model they stand for
        tensors = dequantize_stored(tensors, storage["precision"])
    embedding = tensors.get("model.embed_tokens.weight")
    if as_stored and not storage and embedding is not None and embedding.dtype == torch.bfloat16:
        model.store_matrices_in(torch.bfloat16)
    model.load_state_dict(flopwise_state_dict(tensors, model.config, folder), strict=True)


def resolve_hf_source(spec: str) -> Path:
    """A local model folder, or a hub id (``org/name``) looked up through ``huggingface_hub``'s
    cache, downloading only when the hub is reachable and ``HF_HUB_OFFLINE`` is not set."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FlopwiseError(f"--init-from '{spec}' is a file: give a run folder or a Hugging Face model folder")
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")) or path.parent.is_dir():
        # 'runs/missing' reads as a hub id too, but its first part is a folder here: a mistyped path
        raise FlopwiseError(f"--init-from '{spec}': no such folder: check the path (a run folder, a Hugging Face "
                            "model folder, or a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FlopwiseError(f"--init-from '{spec}' is a hub id, which needs the 'huggingface_hub' package: "
                            "pip install 'flopwise[hf]'") from None
    try:
        return Path(snapshot_download(spec, allow_patterns=_HUB_FILES))
    except Exception as error:  # hub errors have many types (offline, missing repo, auth)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FlopwiseError(f"--init-from '{spec}' is no folder here, and as a hub id neither the Hugging Face "
                            f"hub nor its cache has it ({first_line}): check the path, or download the model "
                            "first") from None
