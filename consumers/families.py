"""The model families a daemon can serve: which raw queue, which pipeline, which job handler.

Imports are by name so a daemon loads only its own family's heavy modules.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str
    raw_queue: str
    pipeline: str  # "module:Class", constructed with Settings, then .setup()
    handler: str  # module with perform(runtime, job, payload) and report_failure(runtime, payload, exc)
    adapter: str  # "module:function": today's payload -> the family's typed request
    # rq workers per daemon process (GENQ_WORKER_THREADS overrides). Image and video workers take
    # turns on the GPU, so a second one overlaps the next job's GPU work with the last one's upload;
    # chat workers run at once, their requests decoded together by the pipeline's batching engine.
    threads: int = 2
    takes_turns: bool = True

    def adapt(self, payload: dict) -> Any:
        module, name = self.adapter.split(":")
        return getattr(importlib.import_module(module), name)(payload)

    def load_pipeline(self, settings) -> Any:
        module, cls = self.pipeline.split(":")
        return getattr(importlib.import_module(module), cls)(settings)

    @property
    def handlers(self):
        return importlib.import_module(self.handler)


FAMILIES: dict[str, Family] = {
    "sdxl": Family("sdxl", "sdxl_queue", "pipelines.sdxl:SdxlPipeline", "consumers.images", "schemas.sdxl:adapt_sdxl"),
    "wan": Family("wan", "wan_queue", "pipelines.wan:WanVideoPipeline", "consumers.videos", "schemas.wan:adapt_wan"),
    "chat": Family("chat", "chat_queue", "pipelines.chat:ChatPipeline", "consumers.chat", "schemas.chat:adapt_chat",
                   threads=16, takes_turns=False),
}
