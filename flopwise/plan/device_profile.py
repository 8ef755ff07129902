"""Device profiles: plan a seconds budget for hardware this machine is not, from declared peaks.

A profile gives the peak dense FLOP/s per dtype and the fraction of it a run is assumed to reach
(MFU).  A step then takes ``flops_per_token * tokens_per_step / (peak * mfu)`` seconds: no probe,
no model built.  The shipped profiles hold the vendors' datasheet peaks (dense, without sparsity),
declared, not measured; the MFU is an assumption the plan lists, and a user's own profile (a TOML
file with the same fields) can replace both with figures measured on their cluster.  A profile
measured here is what `flopwise plan` already does without ``--device-profile``: it probes this
device and caches the result per device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flopwise.config import RunConfig
from flopwise.errors import FlopwiseError
from flopwise.methods.stack import matmul_dtype
from flopwise.model.config import ModelConfig
from flopwise.model.flops import flops_per_token

Dtype = Literal["fp32", "bf16", "fp8"]
# Large-model training on these parts reaches 35-50% of the dense bf16 peak (e.g. the Llama 3 report's
# 38-43% on H100s); small models reach less, so a profile may lower it.
DEFAULT_MFU = 0.4


class DeviceProfile(BaseModel):
    """What a plan assumes of a device it does not measure."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    peak_flops: dict[Dtype, float] = Field(description="dense peak FLOP/s per compute dtype")
    mfu: float = Field(DEFAULT_MFU, gt=0.0, le=1.0, description="fraction of the peak a training step reaches")
    memory_gib: float | None = Field(None, gt=0.0, description="device memory, the plan's memory cap unless "
                                                               "--memory gives one")
    source: str = Field("user profile", description="where the peaks come from")
    declared: bool = Field(True, description="true: the vendor's figures; false: measured")

    @field_validator("peak_flops")
    @classmethod
    def _positive(cls, peaks: dict[str, float]) -> dict[str, float]:
        if not peaks:
            raise ValueError("give at least one dtype's peak, e.g. bf16 = 989e12")
        bad = [f"{dtype} = {value!r}" for dtype, value in peaks.items() if not value > 0]
        if bad:
            raise ValueError(f"peaks must be positive FLOP/s: {', '.join(bad)}")
        return peaks

    def peak_for(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise FlopwiseError(f"device profile '{self.name}' declares no {dtype} peak (it has "
                                f"{', '.join(self.peak_flops)}): set train.precision to one of those, or add "
                                f"peak_flops.{dtype} to the profile")
        return self.peak_flops[dtype]

    def step_seconds(self, cfg: ModelConfig, tokens_per_step: int, dtype: str) -> float:
        return flops_per_token(cfg) * tokens_per_step / (self.peak_for(dtype) * self.mfu)

    def assumptions(self, dtype: str) -> str:
        kind = "declared by the vendor, not measured" if self.declared else "measured"
        memory = f", {self.memory_gib:g} GiB" if self.memory_gib else ""
        return (f"device profile '{self.name}': {dtype} peak {self.peak_for(dtype) / 1e12:g} TFLOP/s dense "
                f"({kind}: {self.source}){memory}; assumed MFU {self.mfu:.0%}, so a step runs at "
                f"{self.peak_for(dtype) * self.mfu / 1e12:g} TFLOP/s; no probe was run")


def _datasheet(name: str, source: str, memory_gib: float, **peaks_tflops: float) -> DeviceProfile:
    return DeviceProfile(name=name, peak_flops={d: t * 1e12 for d, t in peaks_tflops.items()}, memory_gib=memory_gib,
                         source=source)


# Dense (no 2:4 sparsity) peaks from the vendors' datasheets; fp32 is the non-tensor-core rate, which is
# what fp32 matmuls get here (flopwise leaves TF32 off).
PROFILES = {profile.name: profile for profile in (
    _datasheet("h100", "NVIDIA H100 SXM5 datasheet", 80, fp32=67, bf16=989, fp8=1979),
    _datasheet("h100-pcie", "NVIDIA H100 PCIe datasheet", 80, fp32=51, bf16=756, fp8=1513),
    _datasheet("h200", "NVIDIA H200 SXM datasheet", 141, fp32=67, bf16=989, fp8=1979),
    _datasheet("a100", "NVIDIA A100 SXM4 80GB datasheet", 80, fp32=19.5, bf16=312),
    _datasheet("l4", "NVIDIA L4 datasheet", 24, fp32=30.3, bf16=121, fp8=242.5),
    _datasheet("mi300x", "AMD Instinct MI300X datasheet", 192, fp32=163.4, bf16=1307.4, fp8=2614.9),
)}


def load_profile(name_or_file: str) -> DeviceProfile:
    """A shipped profile by name, or a TOML file with the profile's fields."""
    if name_or_file.lower() in PROFILES:
        return PROFILES[name_or_file.lower()]
    path = Path(name_or_file)
    if not path.is_file():
        raise FlopwiseError(f"--device-profile '{name_or_file}' is neither a shipped profile "
                            f"({', '.join(PROFILES)}) nor a file: give one of those names or a TOML file with "
                            "name, peak_flops.<dtype> and mfu")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise FlopwiseError(f"device profile '{path}' is not valid TOML ({err})") from None
    data.setdefault("name", path.stem)
    try:
        return DeviceProfile(**data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise FlopwiseError(f"device profile '{path}': {where}: {first['msg']}") from None


def profile_dtype(config: RunConfig, profile: DeviceProfile) -> str:
    """The dtype a run of ``config`` computes in on the profiled device: a method's own (fp8), the configured
    precision, or for 'auto' bf16 (what flopwise picks on a GPU) where declared."""
    declared = matmul_dtype(config.methods.use)
    if declared is not None:
        return declared
    if config.train.precision != "auto":
        return config.train.precision
    return "bf16" if "bf16" in profile.peak_flops else next(iter(profile.peak_flops))
