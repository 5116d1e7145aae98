"""pipelines/unet_batches.py: a UNet batch run as one-image chunks gives the same images as one call."""
from __future__ import annotations

import pytest
import torch

from bench.models import build_sdxl
from pipelines.unet_batches import BatchChunks, chunk_batches, whole_batches


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_sdxl("cpu", dtype=torch.float32, tiny=True).unet


def _inputs(unet, batch: int):
    g = torch.Generator().manual_seed(batch)
    cfg = unet.config
    sample = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
    text = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": torch.randn(batch, pooled, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    return sample, torch.tensor(500.0), text, added


@pytest.mark.parametrize("batch", [1, 3, 6, 12])
@pytest.mark.parametrize("return_dict", [False, True])
def test_chunks_compute_what_one_call_computes(unet, batch, return_dict):
    calls = []

    def forward(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return unet.forward(sample, *args, **kwargs)

    sample, t, text, added = _inputs(unet, batch)
    with torch.no_grad():
        whole = unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=return_dict)
        got = BatchChunks(forward)(sample, t, encoder_hidden_states=text, added_cond_kwargs=added,
                                   return_dict=return_dict)
    assert calls == [2] * -(-batch // 2)  # the last chunk padded to the unit batch
    whole, got = (whole.sample, got.sample) if return_dict else (whole[0], got[0])
    assert got.shape == whole.shape
    torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-5)


def test_whole_batches_registers_the_shapes_met_inside(unet):
    calls = []
    original = unet.forward
    chunks = chunk_batches(unet, lambda sample, *a, **kw: calls.append(sample.shape[0]) or original(sample, *a, **kw))
    try:
        sample, t, text, added = _inputs(unet, 6)
        with torch.no_grad():
            with whole_batches(unet):
                unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added)
            unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added)  # registered: whole
            unet(sample[:, :, :4], t, encoder_hidden_states=text, added_cond_kwargs=added)  # another size: chunked
        assert calls == [6, 6, 2, 2, 2]
        assert chunks.whole == {tuple(sample.shape)}
    finally:
        del unet.forward  # back to the class's forward


def test_whole_batches_is_a_no_op_on_an_unchunked_unet(unet):
    with whole_batches(unet):
        pass
    assert "forward" not in vars(unet)
