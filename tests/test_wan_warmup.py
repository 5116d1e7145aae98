"""WanVideoPipeline's warm-up at the end of setup(), on the tiny T2V and VACE checkpoints (CPU): it runs
each serving transformer through run(), WAN_WARMUP=0 skips it, a failure refuses to start, and
warmup_shape()/fit_warmup() tell memory admission what it will need."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel
from pydantic import ValidationError

import memory
from consumers.gpu import loading
from pipelines.wan import WanSettings, WanVideoPipeline
from schemas.settings import Settings

pytestmark = pytest.mark.timeout(300)

ALL_MODES = ("none", "single", "start", "end", "both")
REAL = dict(wan_model_path="/models/wan-t2v-1.3b", wan_vace_model_path="/models/wan-vace-1.3b")


def settings(tiny_cache=None, **paths) -> Settings:
    cache = {"tiny_cache_dir": tiny_cache} if tiny_cache else {}
    return Settings(device="cpu", GENQ_HOST="testhost", **cache, **paths)


@pytest.fixture
def calls(monkeypatch):
    """Each transformer class -> the latent (frames, height, width) of every forward call."""
    seen: dict[str, list[tuple[int, int, int]]] = {"T2V": [], "VACE": []}
    for name, cls in (("T2V", WanTransformer3DModel), ("VACE", WanVACETransformer3DModel)):
        def counting(self, hidden_states, *args, _name=name, _forward=cls.forward, **kwargs):
            seen[_name].append(tuple(hidden_states.shape[2:]))
            return _forward(self, hidden_states, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counting)
    return seen


def test_setup_warms_up_each_serving_transformer_through_run(tiny_cache, calls, caplog):
    pipe = WanVideoPipeline(settings(tiny_cache, wan_model_path="tiny", wan_vace_model_path="tiny"),
                            WanSettings(modes_served=ALL_MODES))
    assert (pipe.warmup_shape().width, pipe.warmup_shape().height, pipe.warmup_shape().num_frames) == (32, 32, 5)
    with caplog.at_level(logging.INFO, logger="pipelines.wan"):
        pipe.setup()
    # T2V serves `none`; VACE its cheapest reference mode (`start`: no extra reference frame).
    assert pipe.warmup_runs == [("T2V", "none"), ("VACE", "start")]
    # 2 steps x 2 guidance passes each, at 32x32x5 = 2 latent frames of 4x4
    assert calls == {"T2V": [(2, 4, 4)] * 4, "VACE": [(2, 4, 4)] * 4}
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wan ready")]
    assert len(ready) == 1 and "warmed up at 32x32x5 in" in ready[0] and pipe.warmup_s > 0


def test_warm_up_shape_and_mode_follow_the_settings(tiny_cache, calls, monkeypatch):
    monkeypatch.setenv("WAN_WARMUP_WIDTH", "48")
    monkeypatch.setenv("WAN_WARMUP_HEIGHT", "32")
    monkeypatch.setenv("WAN_WARMUP_FRAMES", "9")
    pipe = WanVideoPipeline(settings(tiny_cache, wan_vace_model_path="tiny"), WanSettings(modes_served=("single",)))
    assert vars(pipe.warmup_shape()) == {"family": "wan", "width": 48, "height": 32, "num_frames": 9}
    pipe.setup()
    assert pipe.warmup_runs == [("VACE", "single")]
    # `single` puts its reference in front as one more latent frame: 3 + 1 frames of 4x6 latents
    assert calls == {"T2V": [], "VACE": [(4, 4, 6)] * 4}


def test_warmup_off_skips_it_and_reserves_nothing(tiny_cache, calls, monkeypatch, caplog):
    monkeypatch.setenv("WAN_WARMUP", "0")
    pipe = WanVideoPipeline(settings(tiny_cache, wan_model_path="tiny"), WanSettings(modes_served=("none",)))
    assert vars(pipe.warmup_shape()) == {"family": "wan", "width": 0, "height": 0, "num_frames": 0}
    assert memory.job_peak_bytes(pipe.warmup_shape()) == 0
    with caplog.at_level(logging.INFO, logger="pipelines.wan"):
        pipe.setup()
    assert calls == {"T2V": [], "VACE": []} and pipe.warmup_runs == [] and pipe.warmup_s is None
    assert any("warm-up off (WAN_WARMUP=0)" in r.getMessage() for r in caplog.records)


def test_failed_warm_up_refuses_to_start(tiny_cache, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(WanVACETransformer3DModel, "forward", out_of_memory)
    pipe = WanVideoPipeline(settings(tiny_cache, wan_model_path="tiny", wan_vace_model_path="tiny"),
                            WanSettings(modes_served=("none", "both")))
    with pytest.raises(RuntimeError, match=r"warm-up of the VACE transformer \(mode both\) at 32x32, 5 frames "
                                           r"failed, refusing to start \(lower WAN_WARMUP_WIDTH.*out of memory"):
        pipe.setup()
    with pytest.raises(RuntimeError, match="setup\\(\\) has not run"):  # it never serves
        pipe.run(pipe._warmup_request(32, 32, 5, "none"))


def test_default_warm_up_is_the_largest_video_the_contract_sends():
    pipe = WanVideoPipeline(settings(**REAL))
    assert vars(pipe.warmup_shape()) == {"family": "wan", "width": 832, "height": 480, "num_frames": 81}
    request = pipe._warmup_request(832, 480, 81, "both")  # a valid request, references included
    assert request.shift == 3.0 and request.steps == 2 and set(request.references) == {"first_frame", "last_frame"}


def test_plan_warms_only_transformers_that_serve_a_mode():
    def plan(modes, t2v=True, vace=True):
        pipe = WanVideoPipeline(settings(**REAL), WanSettings(modes_served=modes))
        pipe._t2v, pipe._vace = (object() if t2v else None), (object() if vace else None)
        return pipe._warmup_plan()

    assert plan(("none",)) == [("T2V", "none")]  # VACE is loaded but never runs
    assert plan(("single", "end")) == [("VACE", "end")]  # T2V serves only `none`
    assert plan(("none", "single"), t2v=False) == [("VACE", "none")]
    assert plan(ALL_MODES) == [("T2V", "none"), ("VACE", "start")]


@pytest.mark.parametrize("env,message", [
    ({"WAN_WARMUP_FRAMES": "80"}, "4k\\+1"),
    ({"WAN_WARMUP_FRAMES": "1"}, "greater than or equal to 5"),
    ({"WAN_WARMUP_WIDTH": "100"}, "multiple of 16"),
    ({"WAN_WARMUP_WIDTH": "1920", "WAN_WARMUP_HEIGHT": "1088"}, "GENQ_LIMIT_WAN_MAX_PIXELS"),
])
def test_bad_warm_up_settings_are_refused(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=message):
        WanSettings()


def test_fit_warmup_takes_the_most_frames_that_fit():
    pipe = WanVideoPipeline(settings(**REAL))
    budget = memory.job_peak_bytes(memory.shape("wan", width=832, height=480, num_frames=33))
    pipe.fit_warmup(lambda shape: memory.job_peak_bytes(shape) <= budget)
    assert (pipe.warmup_shape().width, pipe.warmup_shape().num_frames) == (832, 33)
    pipe = WanVideoPipeline(settings(**REAL))
    pipe.fit_warmup(lambda shape: False)  # nothing fits: the smallest, and admission says why
    assert pipe.warmup_shape().num_frames == 5
    for wan in (WanSettings(warmup_frames=49), WanSettings(warmup=False)):  # the operator's choice wins
        pipe = WanVideoPipeline(settings(**REAL), wan)
        before = vars(pipe.warmup_shape())
        pipe.fit_warmup(lambda shape: False)
        assert vars(pipe.warmup_shape()) == before


def test_loading_on_a_shared_48gb_card_reserves_the_full_warm_up(r):
    """On the 48 GB card shared with SDXL and chat the contract's largest video fits: no fitting down."""
    s = settings(**REAL)
    plan = memory.GpuPlan(memory.GpuInfo(0, "simulated 48GB", 48 * memory.GIB), ("sdxl", "wan", "chat"))
    r.set(memory.PLAN_KEY.format(host="testhost"), json.dumps([plan.to_json()]))
    pipe = WanVideoPipeline(s)
    adm = memory.Admission(r, "testhost", 0, plan.gpu.usable_bytes, "wan-48", family="wan")
    with loading(adm, pipe, "wan", s):
        held = adm.snapshot()["holders"]["wan-48"]["jobs"]
        assert vars(pipe.warmup_shape()) == {"family": "wan", "width": 832, "height": 480, "num_frames": 81}
        assert held == {"warmup:wan-48": memory.job_peak_bytes(pipe.warmup_shape())} and held["warmup:wan-48"] > 0
    adm.leave()
