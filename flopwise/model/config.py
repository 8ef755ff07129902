"""Shape of the decoder: named sizes and a validated config.

Only the standard library: the CLI starts without torch, and an exported model folder carries this file
(with gpt.py) as its modeling code, where neither flopwise nor pydantic need be installed
(flopwise/model/remote.py).  The config section users set lives in flopwise/model/section.py."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

try:  # flopwise's one-line user error; the copy of this file in an exported model folder runs without flopwise
    from flopwise.errors import FlopwiseError
except ImportError:
    FlopwiseError = ValueError

NAMED_SIZES: dict[str, dict] = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 2, "seq_len": 128},
    "small": {"d_model": 128, "n_layers": 4, "n_heads": 4, "seq_len": 256},
    "base": {"d_model": 256, "n_layers": 6, "n_heads": 4, "seq_len": 256},
    "medium": {"d_model": 512, "n_layers": 8, "n_heads": 8, "seq_len": 512},
    "large": {"d_model": 768, "n_layers": 12, "n_heads": 12, "seq_len": 1024},
}

MLPS = ("swiglu", "gelu", "relu2")
NORMS = ("rms", "layer")
POSITIONS = ("rope", "learned")
# The speedrun options (docs/model.md): each off by default, each a change to the decoder that Hugging Face's
# stock Llama/Qwen3 does not compute (multi-token prediction changes only the training loss).
ARCHITECTURE_OPTIONS = ("value_embeds", "x0_lambdas", "unet_skips", "smear", "logit_softcap", "bigram_hash")
OPTIONS = (*ARCHITECTURE_OPTIONS, "mtp_tokens", "mtp_weight")
VALUE_GATE_CHANNELS = 12  # the value-embedding gate reads this many channels of its input (nanochat's ve_gate)
SMEAR_CHANNELS = 24  # the smear gate reads this many channels of the token embedding (nanochat's smear_gate)


def _divisors(n: int, limit: int = 32) -> str:
    return ", ".join(str(k) for k in range(1, min(n, limit) + 1) if n % k == 0)


@dataclass
class ModelConfig:
    """Shape of the decoder; everything the FLOP count and the module need."""

    vocab_size: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_size: int | None = None
    seq_len: int = 256
    max_positions: int | None = None
    mlp_hidden: int | None = None
    qk_norm: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    mlp: str = "swiglu"
    norm: str = "rms"
    positions: str = "rope"
    bias: bool = False
    zero_init_out: bool = False
    value_embeds: bool = False
    x0_lambdas: bool = False
    unet_skips: bool = False
    smear: bool = False
    logit_softcap: float = 0.0
    mtp_tokens: int = 0
    mtp_weight: float = 0.5
    bigram_hash: int = 0

    @property
    def head_dim(self) -> int:
        """Width of one attention head: head_size, or d_model // n_heads (Qwen3 sets it apart)."""
        return self.head_size if self.head_size is not None else self.d_model // self.n_heads

    @property
    def attn_dim(self) -> int:
        """Width of all query heads together (d_model unless head_size is set)."""
        return self.n_heads * self.head_dim

    @property
    def context(self) -> int:
        """Longest context the model is meant for: max_positions (an imported model's), else seq_len;
        learned positions exist only up to seq_len."""
        if self.positions == "learned":
            return self.seq_len
        return max(self.seq_len, self.max_positions or 0)

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_kv_heads, or n_heads when unset)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden(self) -> int:
        """MLP hidden width: mlp_hidden, else 4*d_model for GELU/ReLU², and for SwiGLU 8/3*d_model rounded
        up to a multiple of 32 (LLaMA's choice, which keeps its three matrices at about the parameter
        count of a 4*d_model two-matrix MLP)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp != "swiglu":
            return 4 * self.d_model
        return 32 * math.ceil(round(8 * self.d_model / 3) / 32)

    @property
    def block_linears(self) -> list[tuple[str, int, int]]:
        """(name inside a block, out_features, in_features) of each Linear of a block, in module order:
        the shapes that parameter counts, FLOPs and the memory estimate are built from."""
        kv = self.kv_heads * self.head_dim
        linears = [("self_attn.q_proj", self.attn_dim, self.d_model), ("self_attn.k_proj", kv, self.d_model),
                   ("self_attn.v_proj", kv, self.d_model), ("self_attn.o_proj", self.d_model, self.attn_dim)]
        if self.mlp == "swiglu":
            linears.append(("mlp.gate_proj", self.hidden, self.d_model))
        return linears + [("mlp.up_proj", self.hidden, self.d_model), ("mlp.down_proj", self.d_model, self.hidden)]

    @property
    def llama_style(self) -> bool:
        """RoPE, RMSNorm, SwiGLU and no biases: the layout Hugging Face Llama/Qwen3 compute exactly."""
        return self.positions == "rope" and self.norm == "rms" and self.mlp == "swiglu" and not self.bias

    @property
    def stock_architecture(self) -> bool:
        """LLaMA-style with no speedrun option that changes the function: what a stock Llama/Qwen3 computes.
        Multi-token prediction does not count: it changes the training loss, not the model."""
        return self.llama_style and not any(getattr(self, name) for name in ARCHITECTURE_OPTIONS)

    def value_embed_layers(self) -> list[int]:
        """The layers with a value embedding: every other one, ending with the last (nanochat's ``has_ve``:
        layer_idx % 2 == (n_layer - 1) % 2); none unless value_embeds."""
        if not self.value_embeds:
            return []
        return [i for i in range(self.n_layers) if i % 2 == (self.n_layers - 1) % 2]

    def skip_source(self, layer: int) -> int | None:
        """The encoder layer whose output a U-net skip adds to ``layer``'s input: its mirror n_layers-1-layer,
        for the layers past the middle; None without unet_skips, in the first half and at an odd depth's
        middle layer."""
        mirror = self.n_layers - 1 - layer
        return mirror if self.unet_skips and mirror < layer else None

    def validate(self) -> None:
        """Raise FlopwiseError with a one-line fix for the first inconsistent field."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_size", "seq_len",
                     "max_positions", "mlp_hidden"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise FlopwiseError(f"model.{name}={value!r} must be a positive integer")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise FlopwiseError(f"model.{name}={value!r} must be a positive number")
        for name, allowed in (("mlp", MLPS), ("norm", NORMS), ("positions", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise FlopwiseError(f"model.{name}={getattr(self, name)!r} is unknown: "
                                    f"choose one of {', '.join(allowed)}")
        if self.head_size is None and self.d_model % self.n_heads:
            raise FlopwiseError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}: "
                                f"choose n_heads among {_divisors(self.d_model)}")
        if self.head_size is not None and self.head_size % 2:
            raise FlopwiseError(f"model.head_size={self.head_size} must be even for RoPE")
        if self.head_dim % 2:
            even = ", ".join(str(k) for k in range(1, min(self.d_model, 32) + 1)
                             if self.d_model % k == 0 and (self.d_model // k) % 2 == 0) or "none"
            raise FlopwiseError(f"model.d_model={self.d_model} / model.n_heads={self.n_heads} gives an odd head_dim="
                                f"{self.head_dim}, but RoPE needs it even: choose n_heads among {even}")
        if self.n_heads % self.kv_heads:
            raise FlopwiseError(f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}: "
                                f"choose n_kv_heads among {_divisors(self.n_heads)}")
        self._validate_options()

    def _validate_options(self) -> None:
        """The speedrun options' checks (a saved plan.json or checkpoint is read without the section's)."""
        for name in ("value_embeds", "x0_lambdas", "unet_skips", "smear"):
            if not isinstance(getattr(self, name), bool):
                raise FlopwiseError(f"model.{name}={getattr(self, name)!r} must be true or false")
        for name in ("bigram_hash", "mtp_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise FlopwiseError(f"model.{name}={value!r} must be a whole number >= 0 (0 turns it off)")
        if not isinstance(self.logit_softcap, (int, float)) or isinstance(self.logit_softcap, bool) \
                or not 0 <= self.logit_softcap < math.inf:
            raise FlopwiseError(f"model.logit_softcap={self.logit_softcap!r} must be a finite number >= 0 "
                                "(0 turns it off; the speedruns use 15)")
        if not isinstance(self.mtp_weight, (int, float)) or isinstance(self.mtp_weight, bool) \
                or not 0 < self.mtp_weight < math.inf:
            raise FlopwiseError(f"model.mtp_weight={self.mtp_weight!r} must be a finite number > 0 "
                                "(modded-nanogpt's 0.5)")
        if self.bigram_hash == 1:
            raise FlopwiseError("model.bigram_hash=1 leaves no row to hash bigrams into (one row is kept for a "
                                "sequence's first token): use 0 to turn it off, or >= 2 rows (the record used "
                                "5 x the vocabulary)")
        if self.mtp_tokens >= self.seq_len:
            raise FlopwiseError(f"model.mtp_tokens={self.mtp_tokens} must be below model.seq_len={self.seq_len}: "
                                "a window has no targets that far ahead")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Inverse of to_dict; unknown keys are an error so a typo in a saved file is not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FlopwiseError(f"unknown model config key(s) {', '.join(unknown)}: "
                                f"valid keys are {', '.join(f.name for f in fields(cls))}")
        if "vocab_size" not in d:
            raise FlopwiseError("model config lacks vocab_size: add it (the tokenizer's vocabulary size)")
        return cls(**d)
