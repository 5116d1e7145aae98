"""WAN fast mode (`config.fast_mode`): the adapter, the settings, and the step cache on the tiny T2V and
VACE transformers on the CPU (on for a fast job, on the transformer it uses, off again for the next job)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipelines.step_cache import set_wan_step_cache
from pipelines.wan import WanSettings, WanVideoPipeline
from schemas.errors import PayloadError
from schemas.settings import Settings
from schemas.wan import adapt_wan

from .conftest import PAYLOADS
from .test_pipeline_wan import REFS, pixels, request, with_mode

pytestmark = pytest.mark.timeout(300)

STEPS = 8
# On the tiny random models the first block's residual moves by less than 100% between most steps, so
# threshold 1.0 skips the later blocks on nearly every step after the first (0.1 skips none there).
HIGH = 1.0


# --- the adapter ------------------------------------------------------------------------------------

def payload(**config) -> dict:
    job = json.loads((PAYLOADS / "06_wan_video_fast_t2v.json").read_text())
    job["config"].update(config)
    return job


def test_config_fast_mode_true_asks_for_fast_mode():
    assert adapt_wan(payload(fast_mode=True)).fast_mode is True
    assert adapt_wan(payload(fast_mode=False)).fast_mode is False


def test_absent_or_null_fast_mode_is_a_normal_job():
    job = payload()
    assert "fast_mode" not in job["config"]
    assert adapt_wan(job).fast_mode is False
    assert adapt_wan(payload(fast_mode=None)).fast_mode is False


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, 1.0, [True], {"on": True}])
def test_a_fast_mode_that_is_not_a_boolean_is_refused_naming_the_field(value):
    with pytest.raises(PayloadError) as err:
        adapt_wan(payload(fast_mode=value))
    assert err.value.field == "config.fast_mode"
    assert "true or false" in err.value.message


# --- the settings ------------------------------------------------------------------------------------

def test_fast_settings_defaults_environment_and_bounds(monkeypatch):
    wan = WanSettings()
    assert (wan.fast_threshold, wan.fast_mode_allowed) == (0.1, True)
    monkeypatch.setenv("WAN_FAST_THRESHOLD", "0.25")
    monkeypatch.setenv("WAN_FAST_MODE_ALLOWED", "false")
    wan = WanSettings()
    assert (wan.fast_threshold, wan.fast_mode_allowed) == (0.25, False)
    monkeypatch.setenv("WAN_FAST_THRESHOLD", "1")
    assert WanSettings().fast_threshold == 1.0
    for bad in ("0", "-0.1", "1.5", "nan", "high"):
        monkeypatch.setenv("WAN_FAST_THRESHOLD", bad)
        with pytest.raises(ValidationError, match="WAN_FAST_THRESHOLD"):
            WanSettings()


# --- the pipeline ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_cache) -> WanVideoPipeline:
    """The production layout (T2V for `none`, VACE for the references), fast jobs at threshold 1.0."""
    p = WanVideoPipeline(Settings(device="cpu", tiny_cache_dir=tiny_cache, wan_model_path="tiny",
                                  wan_vace_model_path="tiny"), WanSettings(fast_threshold=HIGH))
    p.setup()
    return p


class BlockCalls:
    """How often each transformer's last block really computed (a hook inside the block: a block the
    cache skips never reaches its feed-forward)."""

    def __init__(self, pipe: WanVideoPipeline):
        self.counts = {"t2v": 0, "vace": 0}
        self.handles = [
            p.transformer.blocks[-1].ffn.register_forward_hook(lambda *_a, name=name: self._add(name))
            for name, p in (("t2v", pipe._t2v), ("vace", pipe._vace))]

    def _add(self, name: str) -> None:
        self.counts[name] += 1

    def run(self, pipe: WanVideoPipeline, req, **kwargs) -> tuple[np.ndarray, dict[str, int]]:
        self.counts = {"t2v": 0, "vace": 0}
        return pixels(pipe.run(req, REFS, **kwargs)), dict(self.counts)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def calls(pipe):
    counter = BlockCalls(pipe)
    yield counter
    counter.close()


JOBS = {"t2v": lambda **k: request(steps=STEPS, **k), "vace": lambda **k: with_mode("start", steps=STEPS, **k)}


@pytest.mark.parametrize("used,other", [("t2v", "vace"), ("vace", "t2v")])
def test_a_fast_job_caches_steps_on_the_transformer_it_uses_and_the_next_job_runs_normally(pipe, calls,
                                                                                            used, other):
    job = JOBS[used]
    normal, normal_calls = calls.run(pipe, job())
    fast, fast_calls = calls.run(pipe, job(fast_mode=True))
    after, after_calls = calls.run(pipe, job())
    # a normal job computes every block on every step, both guidance passes
    assert normal_calls == {used: 2 * STEPS, other: 0}
    # fast: the later blocks are skipped on most steps, and the video is (a little) different
    assert fast_calls[other] == 0 and fast_calls[used] < normal_calls[used] // 2
    assert not np.array_equal(fast, normal)
    # the next normal job: the cache is off again, the same video as before the fast job
    assert after_calls == normal_calls
    assert np.array_equal(after, normal)


def test_a_cancelled_fast_job_leaves_no_cache_and_no_state_behind(pipe, calls):
    class Cancelled(Exception):
        pass

    def cancel_at_step_2(i, _n):
        if i == 2:
            raise Cancelled

    normal, normal_calls = calls.run(pipe, request(steps=STEPS))
    fast, _ = calls.run(pipe, request(steps=STEPS, fast_mode=True))
    with pytest.raises(Cancelled):
        pipe.run(request(steps=STEPS, fast_mode=True, seed=99, prompt="another job"), on_step=cancel_at_step_2)
    # a normal job right after: nothing cached
    after, after_calls = calls.run(pipe, request(steps=STEPS))
    assert after_calls == normal_calls and np.array_equal(after, normal)
    with pytest.raises(Cancelled):
        pipe.run(request(steps=STEPS, fast_mode=True, seed=99, prompt="another job"), on_step=cancel_at_step_2)
    # a fast job right after (same threshold, the cache stays installed): it starts from an empty cache,
    # never from the cancelled job's residuals
    again, _ = calls.run(pipe, request(steps=STEPS, fast_mode=True))
    assert np.array_equal(again, fast)


def test_a_failing_fast_job_leaves_no_cache_behind(pipe, calls, monkeypatch):
    normal, normal_calls = calls.run(pipe, with_mode("start", steps=STEPS))
    vae = pipe._vace.vae

    def broken_decode(*_a, **_k):
        raise RuntimeError("decode failed")

    monkeypatch.setattr(vae, "decode", broken_decode)
    with pytest.raises(RuntimeError, match="decode failed"):
        pipe.run(with_mode("start", steps=STEPS, fast_mode=True), REFS)
    monkeypatch.undo()
    after, after_calls = calls.run(pipe, with_mode("start", steps=STEPS))
    assert after_calls == normal_calls and np.array_equal(after, normal)


@pytest.mark.parametrize("name", ["t2v", "vace"])
def test_a_skipped_step_reuses_exactly_the_cached_result(pipe, name):
    """Same input twice within one job: the second call skips the later blocks and must give the first
    call's output. On VACE, diffusers' FirstBlockCache alone adds the VACE hints a second time (30% off
    on the tiny model): set_wan_step_cache's guard keeps it exact."""
    p = pipe._t2v if name == "t2v" else pipe._vace
    transformer = p.transformer
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=generator), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=generator), return_dict=False)
    if name == "vace":
        inputs["control_hidden_states"] = torch.randn(1, 96, 2, 4, 4, generator=generator)
    try:
        with torch.no_grad():
            set_wan_step_cache(p, None)  # an earlier test's fast job may have been the last one here
            plain = transformer(**inputs)[0]
            set_wan_step_cache(p, 0.5)
            outputs = []
            for _ in range(2):
                with transformer.cache_context("cond"):
                    outputs.append(transformer(**inputs)[0])
    finally:
        set_wan_step_cache(p, None)
    assert torch.equal(outputs[0], plain)
    assert torch.allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_fast_mode_turned_off_on_the_server_is_refused(pipe):
    saved = pipe.wan
    pipe.wan = saved.model_copy(update={"fast_mode_allowed": False})
    try:
        with pytest.raises(PayloadError) as err:
            pipe.run(request(fast_mode=True))
        assert err.value.field == "config.fast_mode"
        assert "turned off on this server" in err.value.message
        assert len(pipe.run(request())) == 5  # normal jobs still run
    finally:
        pipe.wan = saved
