"""A restart that skips dynamo's tracing: torch's caching precompile, with the repairs it needs here.

With GENQ_COMPILE_CACHE_DIR alone, a restart finds inductor's code in the cache but dynamo still traces
the Python of every compiled function again to find which cached graph it is: for the SDXL UNet and VAE
decoder 27.7-33.9 s of a 75.7 s cached start on an H100 host with a slow CPU (docs/PERFORMANCE.md).
`torch._dynamo.config.caching_precompile` (experimental in torch 2.11) also writes dynamo's own result (the
rewritten bytecode, its guards and the compiled graphs) under <cache dir>/dynamo/, and `torch.compile`
installs it on the next start: the first call runs without tracing. Torch checks the Python, torch, CUDA
and Triton versions, the GPU's name and the source of every traced function before it uses an entry, and
traces afresh when any differ. What this module adds:

- `enable` makes guard sources pickle only the fields their constructor takes: torch 2.11 also wrote
  DefaultsSource's derived fields, so no saved entry guarding a default argument could be loaded
  ("DefaultsSource.__init__() takes from 3 to 4 positional arguments but 6 were given"; fixed in 2.13).
- `cached_compile` builds a loaded entry's guards in the mode the function runs in (SDXL: inference
  mode): built outside it, every guard failed on the tensors' dispatch keys and the first call traced
  anyway. It also starts dynamo's global-name counter past the names a loaded entry brought in: the
  counter starts at 0 in every process, so a shape first compiled after a cached start (an unlisted size
  in a job) would pick a name the entry already holds and fail ("Name '__builtins_dict___0' already
  exists in scope", torch 2.11-2.13). An entry that cannot be installed is deleted and the function
  compiled the ordinary way, so a bad cache costs one slower start, never a failed one.
- `save_new` writes what this process compiled, with the entries it loaded, whenever a graph was compiled
  since the last save: after the warm-up, and after a job that met a new size.
- `plain_forward` strips diffusers' LoRA-scale decorator from a forward: torch cannot rebuild the guards
  on its closure from the cache, and it does nothing unless attention kwargs carry a LoRA scale, which
  genq never passes.

The setting drops guards on object identity (ID_MATCH, ...), which is why it is only turned on in a daemon
process that compiles one model's functions once each (SDXL).
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import shutil
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters

log = logging.getLogger(__name__)
_graphs_saved = 0  # dynamo's count of compiled graphs at the last save_new()


class _DroppedGuardNotice(logging.Filter):
    """Torch logs one warning per identity guard it leaves out of a cached entry: hundreds per UNet."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is dropped with caching_precompile" not in record.getMessage()


def enable() -> None:
    """Save and load dynamo's results under the inductor cache folder (set it first:
    accel.configure_compile_cache)."""
    torch._dynamo.config.caching_precompile = True
    _pickle_constructor_fields_only()
    logger = logging.getLogger("torch._dynamo.guards")
    if not any(isinstance(f, _DroppedGuardNotice) for f in logger.filters):
        logger.addFilter(_DroppedGuardNotice())


def enabled() -> bool:
    return bool(torch._dynamo.config.caching_precompile)


def cached_compile(fn: Callable[..., Any], *, inference_mode: bool, **options: Any) -> Callable[..., Any]:
    """torch.compile(fn, **options), installing a cached entry for fn when there is one. inference_mode:
    whether fn will be called under torch.inference_mode()."""
    if not enabled():
        return torch.compile(fn, **options)
    try:
        # A loaded entry's guards expect each tensor's dispatch keys as the thread's mode gives them when
        # the guards are built, here, not as they were traced: built outside the mode fn runs in, they
        # would fail on every call and the first call would trace afresh.
        with torch.inference_mode(inference_mode):
            compiled = torch.compile(fn, **options)
    except Exception:  # torch itself falls back only on RuntimeError
        log.warning("dynamo cache: the entry for %s could not be installed; deleting it and compiling afresh",
                    _name(fn), exc_info=True)
        _delete_entry(fn)
        with torch._dynamo.config.patch(caching_precompile=False):
            return torch.compile(fn, **options)
    _count_past_names(inspect.unwrap(_function(fn)).__globals__)
    return compiled


def save_new() -> None:
    """Write this process's compiled functions to the cache if a graph was compiled since the last write
    (a no-op unless enabled). Call it where no other thread compiles: SdxlPipeline.run() holds the GPU."""
    global _graphs_saved
    graphs = counters["stats"]["unique_graphs"]
    if not enabled() or graphs == _graphs_saved:
        return
    started = time.perf_counter()
    torch.compiler.save_cache_artifacts()
    _graphs_saved = graphs
    folder = _folder()
    log.info("dynamo cache: %d entries in %s (saved in %.1fs)", len(list(folder.glob("*/entry"))), folder,
             time.perf_counter() - started)


def plain_forward(module: torch.nn.Module) -> Callable[..., Any]:
    """module.forward without diffusers' `apply_lora_scale` wrapper (see the module's docstring)."""
    forward = type(module).forward
    while getattr(forward.__code__, "co_qualname", "").startswith("apply_lora_scale.") \
            and hasattr(forward, "__wrapped__"):
        forward = forward.__wrapped__
    return types.MethodType(forward, module)


def _pickle_constructor_fields_only() -> None:
    import torch._dynamo.source  # noqa: F401  (defines the Source subclasses)
    from torch._guards import Source

    def reduce(self):
        return self.__class__, tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.init)

    pending = [Source]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if dataclasses.is_dataclass(cls) and any(not f.init for f in dataclasses.fields(cls)):
            cls.__reduce__ = reduce


def _count_past_names(scope: dict) -> None:
    """Restart dynamo's counter above every number in the dunder globals a loaded entry installed."""
    import torch._dynamo.bytecode_transformation as bytecode

    taken = [int(part) for name in list(scope) if name.startswith("__")
             for part in name.split("_") if part.isdigit()]
    start = max([next(bytecode._unique_id_counter), *(n + 1 for n in taken)])
    bytecode._unique_id_counter = itertools.count(start)


def _function(fn: Callable[..., Any]) -> Callable[..., Any]:
    return fn.__func__ if isinstance(fn, types.MethodType) else fn


def _name(fn: Callable[..., Any]) -> str:
    return getattr(_function(fn), "__qualname__", repr(fn))


def _folder() -> Path:
    from torch._dynamo.package import DynamoCache

    return Path(DynamoCache.path_prefix())


def _delete_entry(fn: Callable[..., Any]) -> None:
    from torch._dynamo.package import CompilePackage

    shutil.rmtree(_folder() / CompilePackage.source_id_from_fn(fn), ignore_errors=True)
