"""pipelines/skinny_linear.py's kernels against F.linear, run on this CPU through Triton's interpreter (in a
child process: the interpreter must be on before Triton compiles anything; fp32, as the interpreter
computes bf16 as integers)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch
import torch.nn.functional as F
from pipelines.skinny_linear import Config, linear

out = []
for rows, n, k, bias, cfg in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(rows * 100 + n)
    x = torch.randn(rows, 1, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = linear(x, w, b, Config(*cfg))
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    out.append({"shape": list(got.shape), "rel_l2": ((got.double() - ref).norm() / ref.norm()).item(),
                "same_twice": torch.equal(got, linear(x, w, b, Config(*cfg)))})
print(json.dumps(out))
"""


def test_skinny_kernels_compute_the_linear_layer_for_up_to_16_rows():
    cases = [
        [16, 96, 64, True, [32, 32, 1, 4, 2]],  # one tile of rows, bias added in the kernel
        [5, 80, 100, False, [32, 32, 1, 4, 2]],  # rows, features and K none a multiple of their block
        [1, 64, 256, True, [16, 32, 3, 4, 2]],  # K split three ways, slices summed by the second kernel
        [16, 48, 200, False, [16, 64, 2, 4, 2]],  # a split whose last slice runs past K
    ]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (rows, n, *_), res in zip(cases, results):
        assert res["shape"] == [rows, 1, n]
        assert res["rel_l2"] < 1e-5, res
        assert res["same_twice"]


def test_skinny_linear_refuses_more_rows_than_one_tile():
    import torch

    from pipelines import skinny_linear

    with pytest.raises(ValueError, match="not supported"):
        skinny_linear.linear(torch.zeros(17, 8), torch.zeros(4, 8))
