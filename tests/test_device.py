import platform

import pytest
import torch

from flopwise.errors import FlopwiseError
from flopwise.runtime import choose_device, choose_dtype, fast_bf16, keep_freed_cpu_memory, measure_matmul_peak


def test_fp32_unless_bf16_is_fast_on_this_device():
    cpu = torch.device("cpu")
    assert choose_dtype("fp32", cpu) == torch.float32
    assert choose_dtype("bf16", cpu) == torch.bfloat16
    expected = torch.bfloat16 if fast_bf16(cpu) else torch.float32
    assert choose_dtype("auto", cpu) == expected
    capability = torch.backends.cpu.get_cpu_capability()
    assert fast_bf16(cpu) == ("AVX512_BF16" in capability or "AMX" in capability)


def test_bad_device_names():
    with pytest.raises(FlopwiseError, match="train.device='gpu7' is not a device"):
        choose_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(FlopwiseError, match="CUDA is not available"):
            choose_device("cuda")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_setting_takes_on_glibc():
    assert keep_freed_cpu_memory() is True


def test_matmul_peak_is_cached_per_machine(tmp_path):
    cpu = torch.device("cpu")
    torch.manual_seed(7)
    first = measure_matmul_peak(cpu, torch.float32, tmp_path)
    assert 1e8 < first < 1e15
    after_measuring = torch.rand(4)
    torch.manual_seed(7)
    # measured (a cold cache) or read back, the run's random stream is the same: runs stay identical
    assert torch.equal(after_measuring, torch.rand(4))
    assert measure_matmul_peak(cpu, torch.float32, tmp_path) == first  # read back, not re-measured
