"""pipelines.dynamo_cache: a restart installs dynamo's saved result instead of tracing, on this CPU with the
real torch.compile (inductor's CPU backend), each start a fresh process as in production."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _start(cache: Path, rows: list[int], save: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    cmd = [sys.executable, __file__, str(cache), ",".join(map(str, rows))] + (["save"] if save else [])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "dynamo").glob("*/entry"))


def test_a_restart_runs_the_saved_graph_without_tracing_and_compiles_and_saves_new_shapes(tmp_path):
    first = _start(tmp_path, [2])
    assert (first["traced_graphs"], first["cache"]) == (1, {"dynamo_cache_miss": 1})
    assert len(_entries(tmp_path)) == 1
    restart = _start(tmp_path, [2, 3])
    assert restart["cache"] == {"dynamo_cache_hit": 1}
    assert restart["traced_after"] == {"2": 0, "3": 1}  # the saved shape ran as loaded; a new one compiled
    assert all(diff < 1e-5 for diff in restart["max_abs_diff"].values())  # against the eager module
    assert _start(tmp_path, [2, 3])["traced_after"] == {"2": 0, "3": 0}  # the new shape was saved with the old


def test_a_damaged_entry_costs_one_compile_not_the_start(tmp_path):
    _start(tmp_path, [2])
    [entry] = _entries(tmp_path)
    entry.write_bytes(b"not a pickle")
    damaged = _start(tmp_path, [2])
    assert damaged["traced_after"] == {"2": 1} and damaged["max_abs_diff"]["2"] < 1e-5
    assert _start(tmp_path, [2])["traced_after"] == {"2": 0}  # rewritten by the start that compiled


def test_save_new_writes_only_when_on_and_after_a_compile(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    from pipelines import dynamo_cache

    writes = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: writes.append(1))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    stats = counters["stats"]
    monkeypatch.setattr(dynamo_cache, "_graphs_saved", stats["unique_graphs"])
    monkeypatch.setitem(stats, "unique_graphs", stats["unique_graphs"])
    with torch._dynamo.config.patch(caching_precompile=True):
        dynamo_cache.save_new()  # a job that compiled nothing
        assert writes == []
        stats["unique_graphs"] += 1  # a job that met a new size
        dynamo_cache.save_new()
        dynamo_cache.save_new()
        assert writes == [1]
    stats["unique_graphs"] += 1
    dynamo_cache.save_new()  # switched off
    assert writes == [1] and not dynamo_cache.enabled()


def test_a_guard_on_a_default_argument_survives_the_round_trip():
    """torch 2.11 pickled DefaultsSource with its derived fields and could not rebuild it."""
    import pickle

    from torch._dynamo.source import DefaultsSource, LocalSource

    from pipelines import dynamo_cache

    with torch._dynamo.config.patch(caching_precompile=False):
        dynamo_cache.enable()
    for source in (DefaultsSource(LocalSource("fn"), 1), DefaultsSource(LocalSource("fn"), "k", is_kw=True)):
        again = pickle.loads(pickle.dumps(source))
        assert again == source and again.name == source.name


def test_plain_forward_strips_only_the_lora_scale_decorator():
    from pipelines.dynamo_cache import plain_forward

    net, plain = _Net(), _Plain()
    assert plain_forward(net).__func__ is _Net.forward.__wrapped__ and plain_forward(net).__self__ is net
    assert plain_forward(plain).__func__ is _Plain.forward
    x = torch.randn(2, 8)
    assert torch.equal(plain_forward(net)(x), net(x))


def _lora_scaled(fn):
    from diffusers.utils.peft_utils import apply_lora_scale

    return apply_lora_scale("cross_attention_kwargs")(fn)


class _Net(torch.nn.Module):
    """Decorated as diffusers decorates UNet2DConditionModel.forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)

    @_lora_scaled
    def forward(self, x, cross_attention_kwargs=None):
        return torch.nn.functional.gelu(self.proj(x)) * 2


class _Plain(torch.nn.Module):
    def forward(self, x):
        return x


def _child(cache: str, rows: list[int], save: bool) -> None:
    """One daemon start: compile the forward as compile_sdxl does, run each batch size as a job does, then
    save_new as SdxlPipeline.run() does."""
    from torch._dynamo.utils import counters

    from pipelines import dynamo_cache
    from pipelines.accel import configure_compile_cache

    configure_compile_cache(cache)
    dynamo_cache.enable()
    net = _Net().eval()
    compiled = dynamo_cache.cached_compile(dynamo_cache.plain_forward(net), fullgraph=True, dynamic=False,
                                           inference_mode=True)
    diffs, traced = {}, {}
    with torch.inference_mode():  # as SdxlPipeline.run() calls the UNet
        for n in rows:
            before = counters["stats"]["unique_graphs"]
            x = torch.randn(n, 8)
            diffs[n] = (compiled(x) - net(x)).abs().max().item()
            traced[n] = counters["stats"]["unique_graphs"] - before
    if save:
        dynamo_cache.save_new()
    print(json.dumps({"max_abs_diff": diffs, "traced_after": traced,
                      "traced_graphs": counters["stats"]["unique_graphs"], "cache": dict(counters["dynamo_cache"])}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _child(sys.argv[1], [int(n) for n in sys.argv[2].split(",")], sys.argv[3:] == ["save"])
