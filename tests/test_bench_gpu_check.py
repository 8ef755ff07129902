"""bench/gpu_check.py in its CPU version (--small): every part runs and writes what the GPU run will, the
datasheet profile is matched by name, and without CUDA the full check refuses in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import BENCH, load_bench

gpu_check = load_bench("gpu_check")


def test_the_device_profile_is_matched_by_the_longest_name():
    assert gpu_check.shipped_profile("NVIDIA H200").name == "h200"
    assert gpu_check.shipped_profile("NVIDIA H100 PCIe").name == "h100-pcie"
    assert gpu_check.shipped_profile("NVIDIA H100 80GB HBM3").name == "h100"
    assert gpu_check.shipped_profile("Tesla T4") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_the_full_check_refuses(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(tmp_path / "g.json")])
    with pytest.raises(SystemExit, match="no CUDA device here; .* --small"):
        gpu_check.main()


@pytest.mark.slow
def test_the_small_check_measures_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--small", "--ttq-seconds", "2", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)  # as it is run: a script
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["skipped"] == []
    assert [row["size"] for row in result["throughput"]] == ["d32x2", "d64x2", "d64x4"]
    for row in result["throughput"]:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu_measured_peak"] < 1
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * row["seq_len"] / row["step_seconds"])
    assert result["resume"]["identical"] and result["resume"]["steps"] == 30
    options = result["options"]
    assert [row["size"] for row in options["throughput"]] == ["d64x2+options"]
    assert options["throughput"][0]["parameters"] > result["throughput"][1]["parameters"]
    assert options["resume"]["identical"] and options["resume"]["steps"] == 30
    ttq = result["time_to_quality"]
    assert ttq["seeds"][0]["baseline"]["seconds_budget"] == 2 and ttq["seeds"][0]["candidates"]
