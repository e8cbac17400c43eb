"""MaskedLinear, the demo and `python -m sparseops info`."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import sparseops
from sparseops import MaskedLinear
from sparseops.cli import info


def test_masked_linear_matches_torch_prune_and_keeps_state_dict_keys():
    lin = nn.Linear(20, 30).double()
    mask = torch.rand(30, 20) > 0.8
    ref = prune.custom_from_mask(copy.deepcopy(lin), "weight", mask)
    ours = MaskedLinear.from_linear(copy.deepcopy(lin), mask)
    x = torch.randn(4, 7, 20, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight_orig.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    assert set(ours.state_dict()) == {"weight", "bias", "weight_mask"}
    assert ours.weight_mask.dtype == torch.bool
    fresh = MaskedLinear(20, 30, dtype=torch.float64)
    fresh.load_state_dict(ours.state_dict())
    torch.testing.assert_close(fresh(x), ours(x))


def test_mask_edit_in_place_takes_effect():
    layer = MaskedLinear(8, 6)
    x = torch.randn(3, 8)
    dense = layer(x)
    torch.testing.assert_close(dense, nn.functional.linear(x, layer.weight, layer.bias))
    with torch.no_grad():
        layer.weight_mask[:, :4] = False
    torch.testing.assert_close(layer(x), nn.functional.linear(x[:, 4:], layer.weight[:, 4:], layer.bias))
    assert layer.sparsity == pytest.approx(0.5)


def test_masked_linear_bad_mask():
    with pytest.raises(ValueError, match="shape"):
        MaskedLinear(4, 3, mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="nn.Linear"):
        MaskedLinear.from_linear(nn.Conv2d(1, 1, 1))


def test_info_names_backends_isa_and_threads():
    text = info()
    assert f"torch {torch.__version__}" in text
    assert "CPU backend: compiled; kernels in use: " + torch.ops.sparseops._cpu_isa() in text
    assert f"L2 {torch.ops.sparseops._cpu_l2_bytes() // 1024} KiB per core" in text
    assert torch.ops.sparseops._cpu_l2_bytes() >= 64 * 1024
    assert "threads: " in text and "CUDA backend:" in text and "Triton" in text


def test_cli_info_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "sparseops", "info"], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(sparseops.__file__)))
    assert "sparseops" in out.stdout and "CPU backend" in out.stdout


def test_isa_env_variable_is_honoured():
    env = dict(os.environ, SPARSEOPS_CPU_ISA="default")
    code = "import torch, sparseops; print(torch.ops.sparseops._cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(sparseops.__file__)))
    assert out.stdout.strip() == "default"


def test_set_cpu_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown CPU instruction set"):
        torch.ops.sparseops._set_cpu_isa("sse9")


def test_demo_runs_imp_with_both_paths_agreeing():
    lines = []
    from sparseops.demo import run

    runs = run(levels=2, epochs=2, hidden=96, batch_size=64, progress=False, out=lines.append)
    assert "mnist_lenet_300_100 preset scaled down to 2 of 40 epochs" in lines[0]  # what it runs, said so
    assert "speed-up" in lines[1] and lines[-1].startswith("whole search:")
    assert "auto's measuring" in lines[-1]  # the tuning cost is visible
    ref, ours = runs["mask multiply"].levels, runs["sparseops"].levels
    assert [r.sparsity for r in ours] == [r.sparsity for r in ref] and ours[-1].sparsity == pytest.approx(0.36, 1e-3)
    for a, b in zip(ref, ours, strict=True):  # same seed: same batches, same masks (float rounding aside)
        assert b.metrics["accuracy"] == pytest.approx(a.metrics["accuracy"], abs=0.02)
        assert b.metrics["accuracy"] > 0.5  # it learns (10 classes: chance is 0.1)
