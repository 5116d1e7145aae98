"""WAN's opt-in step cache (fast mode): diffusers' FirstBlockCache, per job.

While the first transformer block's output barely changes from the last computed step (relative change
under the threshold), the other blocks are skipped and their cached residual is reused: faster, and an
approximation whose difference bench/wan.py measures. A job asks for it with `config.fast_mode: true`
(docs/WAN.md "Fast mode"); `WanVideoPipeline.run()` sets it for every job, so a fast job that failed or
was cancelled never carries over to the next one.
"""
from __future__ import annotations

import torch


def set_wan_step_cache(pipe, threshold: float | None) -> None:
    """The first-block cache on `pipe`'s transformer for the next job: on at `threshold`, off for None or 0.

    Toggled only when the threshold changes (enabling rewires the blocks' hooks); either way the cache's
    state starts empty for every job, and on VACE the hints are not counted twice on a skipped step
    (_VaceHintGuard).
    """
    from diffusers.hooks import FirstBlockCacheConfig

    transformer = pipe.transformer
    if getattr(transformer, "_genq_step_cache", None) != threshold:
        if getattr(transformer, "_genq_step_cache", None):
            transformer.disable_cache()
        if threshold:
            transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        transformer._genq_step_cache = threshold or None
    if hasattr(transformer, "vace_blocks"):
        _VaceHintGuard.sync(transformer, bool(threshold))
    if threshold:
        # diffusers clears the cache's state only when a pipeline call returns normally: after a job that
        # failed or was cancelled mid-way, the next fast job (same threshold, so the cache stays installed)
        # would compare its first step with, and reuse the residuals of, another job's last step.
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks()


class _VaceHintGuard:
    """Keeps diffusers' FirstBlockCache exact on VACE transformers.

    WanVACETransformer3DModel adds a VACE hint to the hidden states after each of `vace_layers`, outside
    the blocks. The first-block cache's residual for the skipped blocks (tail output minus first-block
    output, taken on the last computed step) already holds the hints of every VACE layer before the last
    block; on a skipped step the transformer adds that step's hints again, so they count twice (on the
    tiny model a step with the very same input moves by 30% instead of 0). While the cache is on, this
    guard keeps the hints of those layers and, when the first block decides to skip, zeroes them before
    the transformer adds them: a skipped step then gives exactly the cached result, as on T2V.
    """

    def __init__(self, transformer):
        self.transformer = transformer
        self.hints: list[torch.Tensor] = []
        last_block = len(transformer.blocks) - 1
        # Hint k (k-th VACE block) is added after block sorted(vace_layers)[k] (diffusers' pop order).
        inside = [k for k, layer in enumerate(sorted(transformer.config.vace_layers)) if layer < last_block]
        self.handles = [transformer.register_forward_pre_hook(self._start)]
        self.handles += [transformer.vace_blocks[k].register_forward_hook(self._keep) for k in inside]
        self.handles.append(transformer.blocks[0].register_forward_hook(self._after_first_block))

    @classmethod
    def sync(cls, transformer, on: bool) -> None:
        guard = getattr(transformer, "_genq_hint_guard", None)
        if on and guard is None:
            transformer._genq_hint_guard = cls(transformer)
        elif not on and guard is not None:
            for handle in guard.handles:
                handle.remove()
            transformer._genq_hint_guard = None

    @torch.compiler.disable
    def _start(self, _module, _args):
        self.hints.clear()

    @torch.compiler.disable
    def _keep(self, _module, _args, output):
        self.hints.append(output[0])

    @torch.compiler.disable
    def _after_first_block(self, module, _args, _output):
        from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

        registry = getattr(module, "_diffusers_hook", None)
        leader = registry.get_hook(_FBC_LEADER_BLOCK_HOOK) if registry is not None else None
        if leader is not None and not leader.state_manager.get_state().should_compute:
            for hint in self.hints:
                hint.zero_()  # this step's own tensors, not yet added (all VACE blocks ran before block 0)
        self.hints.clear()
