"""pipelines/skinny_linear.py's kernels against F.linear, with weights of the rows' dtype and FP8 weights,
run on this CPU through Triton's interpreter (in a child process: the interpreter must be on before
Triton compiles anything; fp32, as the interpreter computes bf16 as integers)."""
from __future__ import annotations

import json

import pytest

from tests.interpreted import run_interpreted

pytest.importorskip("triton")


CHILD = r"""
import json, sys, torch
import torch.nn.functional as F
from pipelines.fp8_linear import dequantise, quantise
from pipelines.skinny_linear import Config, linear

out = []
for rows, n, k, bias, cfg, fp8 in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(rows * 100 + n)
    x = torch.randn(rows, 1, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    scale = None
    if fp8:  # e4m3 weights with a scale per output feature, against the same weights dequantised
        w, scale = quantise(w)
    got = linear(x, w, b, Config(*cfg), scale=scale)
    exact = w.double() if scale is None else dequantise(w, scale, torch.float64)
    ref = F.linear(x.double(), exact, None if b is None else b.double())
    out.append({"shape": list(got.shape), "rel_l2": ((got.double() - ref).norm() / ref.norm()).item(),
                "same_twice": torch.equal(got, linear(x, w, b, Config(*cfg), scale=scale))})
print(json.dumps(out))
"""


def test_skinny_kernels_compute_the_linear_layer_for_up_to_16_rows():
    cases = [
        [16, 96, 64, True, [32, 32, 1, 4, 2], False],  # one tile of rows, bias added in the kernel
        [5, 80, 100, False, [32, 32, 1, 4, 2], False],  # rows, features and K none a multiple of their block
        [1, 64, 256, True, [16, 32, 3, 4, 2], False],  # K split three ways, slices summed by the second kernel
        [16, 48, 200, False, [16, 64, 2, 4, 2], False],  # a split whose last slice runs past K
        # FP8 weights (GENQ_CHAT_WEIGHTS=fp8): widened in the kernel, the scale on the sums
        [16, 96, 64, True, [32, 32, 1, 4, 2], True],
        [5, 80, 100, False, [32, 32, 1, 4, 2], True],
        [1, 64, 256, True, [16, 32, 3, 4, 2], True],  # split: every slice carries the scale
        # one row through the vector kernel (config_for's choice for FP8 weights at one row)
        [1, 64, 128, True, [16, 64, 1, 4, 1, True], True],  # every tile whole: unmasked loads
        [1, 96, 200, True, [4, 64, 1, 4, 1, True], True],  # K not a multiple of its block
        [1, 64, 256, False, [8, 32, 3, 4, 1, True], True],  # three slices, the last past K, summed in order
        [1, 80, 100, True, [16, 32, 2, 4, 1, True], False],  # weights of the rows' dtype, split, bias after
    ]
    results = run_interpreted(CHILD, json.dumps(cases), timeout=300)
    for (rows, n, *_), res in zip(cases, results):
        assert res["shape"] == [rows, 1, n]
        assert res["rel_l2"] < 1e-5, res
        assert res["same_twice"]


def test_skinny_linear_refuses_more_rows_than_one_tile():
    import torch

    from pipelines import skinny_linear

    with pytest.raises(ValueError, match="not supported"):
        skinny_linear.linear(torch.zeros(17, 8), torch.zeros(4, 8))
    fp8 = torch.zeros(4, 8).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="not supported"):  # FP8 weights need their fp32 scale per feature
        skinny_linear.linear(torch.zeros(2, 8), fp8, scale=torch.ones(4, dtype=torch.float64))
    assert skinny_linear.supported(torch.zeros(2, 8), fp8, torch.ones(4))
    with pytest.raises(ValueError, match="vector kernel takes one row, x has 2"):
        skinny_linear.linear(torch.zeros(2, 8), fp8, cfg=skinny_linear.Config(vector=True), scale=torch.ones(4))


def test_one_row_of_fp8_weights_goes_to_the_vector_kernel_and_more_rows_to_the_tile_kernel():
    from pipelines.skinny_linear import TABLE, Config, config_for

    assert config_for(4608, 3584, fp8=True, rows=1).vector
    assert not config_for(4608, 3584, fp8=True, rows=16).vector
    assert config_for(4608, 3584, fp8=False, rows=1) == Config()  # bf16 decode keeps inductor's products
    measured = Config(8, 512, 2, 8, 3, True)
    TABLE[(96, 64, True, True)] = measured
    try:
        assert config_for(96, 64, fp8=True, rows=1) == measured
        assert config_for(96, 64, fp8=True, rows=4) != measured
    finally:
        del TABLE[(96, 64, True, True)]
