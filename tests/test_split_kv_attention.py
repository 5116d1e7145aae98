"""The split-KV decode attention kernels (pipelines/split_kv_attention.py) against the matrix-product
attention, run on this CPU through Triton's interpreter. The interpreter must be on before Triton
compiles anything, so the kernels run in a child process; it computes bf16 as integers, so the dtypes
here are fp32 and fp16 (bf16 is checked on the GPU: bench.qwen_profile's attention_rel_l2_vs_fp32)."""
from __future__ import annotations

import json

import pytest

from tests.interpreted import run_interpreted

pytest.importorskip("triton")


CHILD = r"""
import json, sys, torch
from pipelines.decoder import matmul_attention
from pipelines.split_kv_attention import plan

cases = json.loads(sys.argv[1])
out = []
for rows, kv, rep, dim, length, pads, live, dtype in cases:
    g = torch.Generator().manual_seed(rows * 1000 + length)
    dt = getattr(torch, dtype)
    q = torch.randn(rows, kv, rep, dim, generator=g).to(dt)
    keys = torch.randn(rows, kv, length, dim, generator=g).to(dt)
    values = torch.randn(rows, kv, length, dim, generator=g).to(dt)
    cols = torch.arange(length)
    keep = ((cols >= torch.tensor(pads)[:, None]) & (cols < live))[:, None, None, :]
    exact = matmul_attention(q.double(), keys.double(), values.double(), keep, 0.125)
    got = torch.ops.genq.split_kv_attention(q, keys, values, keep, 0.125)
    err = ((got.double() - exact).norm() / exact.norm()).item()
    out.append({"splits": plan(rows * kv, length, 132)[0], "rel_l2": err, "shape": list(got.shape),
                "dtype": str(got.dtype).removeprefix("torch."), "finite": bool(torch.isfinite(got).all())})
print(json.dumps(out))
"""


def _run(cases: list) -> list[dict]:
    return run_interpreted(CHILD, json.dumps(cases), timeout=300)


def test_split_kernels_compute_the_masked_softmax_attention_of_each_row():
    cases = [
        # Qwen 2.5 7B's heads (4 key/value heads, 7 grouped query heads padded to 16), one row, a cache
        # length that is no multiple of the 64-column step, the live part ending mid-step
        [1, 4, 7, 128, 300, [0], 290, "float32"],
        # several rows, every other one left-padded past the first slice (a slice with nothing live)
        [4, 2, 3, 32, 512, [0, 200, 0, 130], 470, "float32"],
        [3, 2, 7, 64, 200, [0, 70, 5], 200, "float16"],
        # a cache of one inner step: the merge of a single slice
        [3, 4, 2, 16, 64, [0, 10, 0], 40, "float32"],
    ]
    results = _run(cases)
    for case, res in zip(cases, results):
        rows, kv, rep, dim, length, _, _, dtype = case
        assert res["shape"] == [rows, kv, rep, dim] and res["dtype"] == dtype and res["finite"], (case, res)
        assert res["rel_l2"] < (1e-5 if dtype == "float32" else 2e-3), (case, res)
    assert [r["splits"] for r in results] == [3, 4, 2, 1]  # the cases do cover one and several slices


def test_the_plan_spreads_blocks_over_the_card_without_empty_slices():
    from pipelines.split_kv_attention import Config, plan

    block = Config().block

    for rows_heads, length in [(4, 2048), (64, 1024), (64, 4096), (4, 100), (1, 64), (512, 4096), (7, 1000)]:
        splits, chunk = plan(rows_heads, length, 132)
        assert chunk % block == 0 and splits * chunk >= length > (splits - 1) * chunk
        assert rows_heads * splits <= 4 * 132 + rows_heads  # about four blocks an SM
    assert plan(4, 2048, 132) == (16, 128)  # one row of Qwen 7B: every step of the cache its own block
    assert plan(64, 1024, 132) == (8, 128)  # 16 rows
    assert plan(64, 4096, 132) == (8, 512)
    assert plan(2000, 1024, 132) == (1, 1024)


def test_auto_decodes_batches_with_the_split_kernels_where_cuda_is(monkeypatch):
    """GENQ_CHAT_ATTENTION=auto: every batch through split_attention once CUDA is there (on a CPU tensor
    it computes what the products do, so the tokens must match them); without CUDA none."""
    import torch

    import pipelines.decoder as decoder_module
    from bench.models import build_qwen
    from pipelines.chat_options import BatchOptions

    model = build_qwen("cpu", tiny=True)
    prompt = torch.randint(100, 1000, (1, 30), generator=torch.Generator().manual_seed(0)).expand(3, -1)
    mask = torch.ones_like(prompt)

    def decode(attention, rows):
        with torch.inference_mode():
            return BatchOptions(attention=attention).decoder(model, 4096).generate(prompt[:rows], mask[:rows], 10)

    expected = {rows: decode("matmul", rows) for rows in (1, 3)}
    calls = []
    split = decoder_module.split_attention
    monkeypatch.setattr(decoder_module, "split_attention", lambda *a: calls.append(a[0].shape[0]) or split(*a))
    assert decode("auto", 1) == expected[1] and calls == []  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert decode("auto", 1) == expected[1] and set(calls) == {1}
    assert decode("auto", 3) == expected[3] and set(calls) == {1, 4}  # 3 rows run in the 4-row bucket
    assert torch.ops.genq.split_kv_attention.default is not None  # registered on the way


def test_shapes_the_kernels_do_not_take_keep_the_fused_kernel():
    from pipelines.split_kv_attention import supported

    assert supported(128, 7) and supported(64, 7) and supported(128, 16)  # Qwen 2.5 7B, 0.5B; 16 per head
    assert not supported(96, 7) and not supported(256, 7) and not supported(128, 32)
