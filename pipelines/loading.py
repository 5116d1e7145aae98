"""What every family's pipeline needs before loading weights: a device, a dtype and a model path.

Call these in the process that will run the model, after any fork: asking torch about CUDA
initialises the driver, and a forked child of a process that did so cannot use CUDA.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from filelock import FileLock

from schemas.settings import Settings

TINY = "tiny"


def pick_device(settings: Settings) -> torch.device:
    """settings.device: "cuda" (GPU settings.gpu_index, must exist), "cpu", or "auto" (CUDA when present)."""
    wanted = settings.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("GENQ_DEVICE=cuda but torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES, CPU-only torch?)")
    count = torch.cuda.device_count()
    if count == 1:
        # The orchestrator pins each daemon with CUDA_VISIBLE_DEVICES=<n>: the one visible card is
        # cuda:0 whatever its physical index (GENQ_GPU_INDEX, used for admission and status).
        return torch.device("cuda", 0)
    if settings.gpu_index >= count:
        raise RuntimeError(f"GENQ_GPU_INDEX={settings.gpu_index} but only {count} CUDA device(s) are visible")
    return torch.device("cuda", settings.gpu_index)


def pick_dtype(device: torch.device) -> torch.dtype:
    """Half precision on GPU (speed, memory), full precision on CPU (where fp16 kernels are slow or missing)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_model_path(path: str | None, family: str, settings: Settings, builder: Callable[[Path], None],
                       *, setting: str | None = None) -> Path:
    """The folder or file to load for `family`.

    "tiny" builds a random-weight model with `builder(dir)` once, under settings.tiny_cache_dir/<family>,
    and reuses it afterwards. Anything else must exist; errors name the setting (default
    <FAMILY>_MODEL_PATH) so an operator knows what to fix.
    """
    setting = setting or f"{family.upper()}_MODEL_PATH"
    if not path:
        raise RuntimeError(f"{setting} is not set: give a model folder or file, or 'tiny' for random test weights")
    if path == TINY:
        return _build_once(Path(settings.tiny_cache_dir), family, builder)
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"{setting}={path}: no such file or folder")
    return resolved


def _build_once(cache_dir: Path, family: str, builder: Callable[[Path], None]) -> Path:
    target = cache_dir / family
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Another process may be building the same model: wait for it rather than build twice. The build
    # happens in a scratch folder renamed into place, so a reader never sees half a model.
    with FileLock(str(cache_dir / f".{family}.lock")):
        if target.exists():
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=cache_dir))
        try:
            builder(scratch)
            os.rename(scratch, target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target


@contextmanager
def warm_up_or_refuse(device: torch.device, release: Callable[[], None], failure: str) -> Iterator[None]:
    """Around a warm-up run at start. Any error calls `release()` (the pipeline drops its components, so
    their memory goes and the object cannot serve) and becomes RuntimeError("<failure>: <error>"), which
    refuses the start. Either way the run's cached CUDA blocks go back to the card's other processes."""
    try:
        yield
    except Exception as exc:
        release()
        raise RuntimeError(f"{failure}: {type(exc).__name__}: {exc}") from exc
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
