"""Shared benchmark machinery: warm timing, peak memory, output comparison, result files, time budget."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

GIB = 1024**3


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--tiny", action="store_true", help="tiny configs: a smoke run that works on a CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per figure, after one warm-up")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip optional stages past this wall time")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the accelerated path")
    if extra:
        extra(ap)
    return ap.parse_args()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def card() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(card=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / GIB, 1))
    else:
        info["card"] = "cpu"
    return info


# Datasheet memory bandwidth (TB/s) by card name, most specific first: the Qwen one-stream target is 70% of it.
_BANDWIDTH_TB_S = (("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35))


def bandwidth_tb_s(card_name: str) -> float | None:
    return next((tb for key, tb in _BANDWIDTH_TB_S if key in card_name), None)


def decode_read_bytes(model) -> int:
    """Bytes a one-token decode step reads: every weight, but only one row of the embedding table (unless
    the LM head shares it, as tied embeddings do: then the head reads all of it)."""
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.get_output_embeddings().weight is embed:
        return total
    return total - embed.numel() * embed.element_size()


class Report:
    """Collects figures and writes them after every stage, so a run cut off still leaves its numbers."""

    def __init__(self, name: str, args):
        self.args = args
        self.start = time.perf_counter()
        self.path = Path(args.out) / f"{name}{'_tiny' if args.tiny else ''}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"command": " ".join([Path(sys.executable).name] + sys.argv),
                                     "env": card(), "stages": {}, "errors": {}, "skipped": []}
        self.save()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.data["wall_s"] = round(self.elapsed(), 1)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def stage(self, name: str, fn: Callable[[], Any], optional_cost_s: float | None = None) -> Any:
        """Run a stage, record its result or error; optional stages are skipped when the budget is short."""
        if optional_cost_s is not None and self.elapsed() + optional_cost_s > self.args.budget_s:
            self.data["skipped"].append(name)
            print(f"[skip] {name}: {self.elapsed():.0f}s used of {self.args.budget_s:.0f}s", flush=True)
            self.save()
            return None
        t0 = time.perf_counter()
        print(f"[stage] {name} (at {self.elapsed():.0f}s)", flush=True)
        try:
            result = fn()
        except Exception as exc:  # a failed stage must not lose the others' figures
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            result = None
        else:
            if result is not None:
                self.data["stages"][name] = result
        print(f"[done] {name} in {time.perf_counter() - t0:.1f}s: {json.dumps(result, default=str)[:600]}",
              flush=True)
        self.save()
        return result

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()


def reset_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory(device: str) -> dict:
    if not device.startswith("cuda"):
        return {}
    return {"allocated_gib": round(torch.cuda.memory_allocated() / GIB, 3),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3)}


def _wall(fn: Callable[[], Any], device: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def timed(fn: Callable[[], Any], device: str, runs: int, warmup: int = 1, **extra) -> dict:
    """Warm-up run(s) first (compilation, allocator growth), then `runs` synchronised wall-clock timings."""
    cold = _wall(fn, device, warmup)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = _wall(fn, device, runs)
    return {"warmup_s": [round(t, 4) for t in cold], "times_s": [round(t, 4) for t in times],
            "min_s": round(min(times), 4), "median_s": round(statistics.median(times), 4), **memory(device), **extra}


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Relative L2 error, max abs error and PSNR (for [0,1] images) of got against ref, in fp32."""
    ref, got = ref.detach().float().flatten(), got.detach().float().flatten().to(ref.device)
    err = got - ref
    mse = float(err.pow(2).mean())
    return {"rel_l2": float(err.norm() / ref.norm().clamp_min(1e-12)), "max_abs": float(err.abs().max()),
            "psnr_db_if_unit_range": round(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-20))).item(), 2),
            "finite": bool(torch.isfinite(got).all())}


def ratio(base: dict | None, ours: dict | None, key: str = "min_s") -> float | None:
    if not base or not ours:
        return None
    return round(base[key] / ours[key], 3)


def import_accel():
    """pipelines.accel, without pipelines/__init__'s imports (the GPU image lacks the daemon's deps)."""
    try:
        from pipelines import accel
        return accel
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "genq_accel", Path(__file__).resolve().parent.parent / "pipelines" / "accel.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def graph_time(fn, reps: int, device: str) -> float:
    """Seconds per call of fn, `reps` calls replayed as one CUDA graph (min of 5 replays); on a CPU one timed
    call after a warm-up."""
    if device != "cuda":
        fn()
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    for _ in range(2):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    del graph
    return min(times)
