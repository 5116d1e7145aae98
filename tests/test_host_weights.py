"""HostWeights: the WAN text encoder's weights held on the host and lent to a device per job. On this CPU the
visit's device is the CPU itself (a visit copies even then); the pinned copy and the copy speed are the GPU's,
measured by bench/text_encoder_visit.py."""
from __future__ import annotations

import pytest
import torch

from bench.models import build_umt5
from pipelines.host_weights import HostWeights


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return build_umt5("cpu", tiny=True)


def encode(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


IDS = torch.tensor([[5, 17, 230, 4, 1]])


def test_a_visit_lends_every_weight_and_the_end_of_it_copies_nothing_back(encoder):
    before = encode(encoder, IDS)
    held = HostWeights(encoder, pin=False)
    hosts = [t.data_ptr() for t in [*encoder.parameters(), *encoder.buffers()]]
    assert held.nbytes >= sum(t.numel() * t.element_size() for t in [*encoder.parameters(), *encoder.buffers()])
    assert not held.pinned and all((p - held._block.data_ptr()) % 256 == 0 for p in hosts)  # one block, aligned starts
    with held.visit("cpu") as lent:
        lent_ptrs = [t.data_ptr() for t in [*encoder.parameters(), *encoder.buffers()]]
        assert lent is encoder and not set(lent_ptrs) & set(hosts)
        assert torch.equal(encode(encoder, IDS), before)
    assert [t.data_ptr() for t in [*encoder.parameters(), *encoder.buffers()]] == hosts
    assert torch.equal(encode(encoder, IDS), before)


def test_the_host_copies_come_back_whatever_the_visit_raised(encoder):
    held = HostWeights(encoder, pin=False)
    hosts = [t.data_ptr() for t in encoder.parameters()]
    with pytest.raises(RuntimeError, match="job failed"):
        with held.visit("cpu"):
            next(encoder.parameters()).data.zero_()  # whatever happens to the lent copy stays there
            raise RuntimeError("job failed")
    assert [t.data_ptr() for t in encoder.parameters()] == hosts
    assert next(encoder.parameters()).abs().sum() > 0


def test_a_wan_job_encodes_its_prompt_the_same_through_a_visit(tiny_cache):
    from tests.test_pipeline_wan import loaded, request

    pipe = loaded(tiny_cache, modes=("none",), wan_model_path="tiny")
    assert pipe._text_weights is None  # on a CPU the encoder stays where it is
    resident = pipe.run(request())
    pipe._text_weights = HostWeights(pipe._t2v.text_encoder, pin=False)  # what setup() does on a GPU
    visited = pipe.run(request())
    assert [f.tobytes() for f in visited] == [f.tobytes() for f in resident]
