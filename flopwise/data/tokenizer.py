"""Text to token ids: a thin wrapper over a Hugging Face ``tokenizers.Tokenizer``.

Every tokenizer, including the byte tokenizer, is a ``tokenizers`` object, so saving,
loading and exporting as ``tokenizer.json`` work the same way for all of them.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from flopwise.errors import FlopwiseError

EOS = "<|endoftext|>"
# End-of-text names used by common Hugging Face tokenizers, tried when no config names one.
EOS_CANDIDATES = (EOS, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
MIN_BPE_VOCAB = 256 + 2  # the byte alphabet, the end-of-text token, and at least one merge


class Tokenizer:
    """Encodes batches with the Rust encoder and knows the UTF-8 length of every token."""

    def __init__(self, tokenizer: HFTokenizer, eos_token: str | None = None) -> None:
        self._tokenizer = tokenizer
        self._eos_id = _find_eos(tokenizer, eos_token)
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id, so an embedding of this size covers every id."""
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def eos_token(self) -> str:
        return self._tokenizer.id_to_token(self._eos_id)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (the caller appends end-of-text)."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for (0 for special tokens), for bits per byte."""
        special = {i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special}
        byte_level = _is_byte_level(json.loads(self.to_json()).get("decoder"))
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, index in self._tokenizer.get_vocab(with_added_tokens=True).items():
            if index not in special:
                lengths[index] = len(token) if byte_level and _in_byte_alphabet(token) else self._decoded_length(index)
        return lengths

    def _decoded_length(self, index: int) -> int:
        token = self._tokenizer.id_to_token(index)
        if token.startswith("<0x") and token.endswith(">") and len(token) == 6:  # SentencePiece byte fallback
            return 1
        return len(self._tokenizer.decode([index], skip_special_tokens=False).encode("utf-8"))

    def to_json(self) -> str:
        """The full tokenizer definition, used in cache keys and by ``save``."""
        return self._tokenizer.to_str()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a ``tokenizer.json`` file or a Hugging Face tokenizer folder holding one."""
        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FlopwiseError(f"tokenizer '{path}' is neither a tokenizer.json file nor a folder with one: "
                                "pass a tokenizer.json path, a Hugging Face tokenizer folder, 'bpe' or 'byte'")
        try:
            tokenizer = HFTokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises a bare Exception on malformed files
            raise FlopwiseError(f"tokenizer '{file}' cannot be read ({error}): pass a valid tokenizer.json") from None
        return cls(tokenizer, _configured_eos(file.parent / "tokenizer_config.json"))


def _find_eos(tokenizer: HFTokenizer, configured: str | None) -> int:
    for name in (configured, *EOS_CANDIDATES):
        index = tokenizer.token_to_id(name) if name else None
        if index is not None:
            return index
    raise FlopwiseError(f"the tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)}): "
                        "use a tokenizer with one, or 'bpe'/'byte'")


def _configured_eos(config: Path) -> str | None:
    """The ``eos_token`` of a Hugging Face ``tokenizer_config.json``, if there is one."""
    if not config.is_file():
        return None
    eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _is_byte_level(decoder: dict | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "Sequence":
        return any(_is_byte_level(d) for d in decoder.get("decoders", []))
    return decoder.get("type") == "ByteLevel"


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _in_byte_alphabet(token: str) -> bool:
    alphabet = _byte_alphabet()
    return all(char in alphabet for char in token)


@cache
def _byte_alphabet() -> frozenset[str]:
    return frozenset(bytes_to_unicode().values())


def _byte_level(model: models.Model) -> HFTokenizer:
    tokenizer = HFTokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens (id = byte value) and ``<|endoftext|>`` (id 256): for tests and tiny runs."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = _byte_level(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens([EOS])
    return Tokenizer(tokenizer)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style, every byte in the alphabet, so no text is unknown)."""
    if vocab_size < MIN_BPE_VOCAB:
        raise FlopwiseError(f"data.vocab_size={vocab_size} is too small for byte-level BPE: use at least "
                            f"{MIN_BPE_VOCAB} (256 bytes + end-of-text + merges), or data.tokenizer='byte'")
    tokenizer = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return Tokenizer(tokenizer)
