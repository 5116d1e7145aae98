"""Qwen 2.5 decoding for the chat batching engine: batched rows, a length-bucketed KV pool, one compiled
decode step per (rows, length) shape, sampling on the device.

`FastDecoder` drives a transformers Qwen2 (Llama-layout) model's own modules; `DecodeBatch`
(pipelines/decode_batch.py) is one running batch that rows join and leave. Its switches are GENQ_CHAT_*
(pipelines/chat_options.py, docs/CHAT.md).
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .accel import raise_recompile_limit
from .chat_options import ATTENTION_MODES
from .decode_batch import GREEDY, DecodeBatch, DecodeRow, Sampling
from .fused import FusedProjections, mlp, project_qkv


class UnsupportedModel(ValueError):
    """Not the Llama/Qwen2 module layout FastDecoder drives directly; the caller keeps generate()."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def length_buckets(min_len: int, max_len: int) -> tuple[int, ...]:
    """Cache lengths a row may get: powers of two from min_len, then max_len itself."""
    out, length = [], max(1, min(min_len, max_len))
    while length < max_len:
        out.append(length)
        length *= 2
    return tuple(out + [max_len])


class _KVPool:
    """Keys and values of every layer in one flat buffer each; a (batch, length) shape is a contiguous
    [batch, kv_heads, length, head_dim] tensor over the start of those buffers, so every shape shares
    the memory and rows keep their place when a batch grows at a fixed length."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, tokens: int, dtype, device, static: bool):
        self.shape = (kv_heads, head_dim)
        # Zeros, never garbage: a masked key still meets the query in q.k, and NaN * 0 is NaN.
        self.buffers = [torch.zeros(tokens * kv_heads * head_dim, dtype=dtype, device=device)
                        for _ in range(2 * layers)]
        self.static = static
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}

    def views(self, batch: int, length: int) -> list[torch.Tensor]:
        if (batch, length) not in self._views:
            heads, dim = self.shape
            views = []
            for buf in self.buffers:
                # A plain tensor over the buffer's storage (not a view object), one per shape and layer.
                t = torch.empty(0, dtype=buf.dtype, device=buf.device)
                t.set_(buf.untyped_storage(), 0, (batch, heads, length, dim))
                if self.static:  # CUDA graphs read it in place instead of copying it in every replay;
                    # unguarded: a new pool (after the weights went to CPU and back) re-records the
                    # graphs instead of compiling them again
                    torch._dynamo.mark_static_address(t, guard=False)
                views.append(t)
            self._views[(batch, length)] = views
        return self._views[(batch, length)]

    def zero_(self) -> None:
        for buf in self.buffers:
            buf.zero_()


class FastDecoder:
    """Decodes batches of rows of a transformers Qwen2 (Llama-layout) causal LM on its own modules.

    Every row has its own prompt, length limit and sampling rule (`Sampling`). Keys and values live in a
    pool of `pool_tokens` tokens shared by all shapes; a batch gets a (rows, length) shape from
    `batch_buckets` x `length_buckets` with rows x length <= pool_tokens, so attention reads the length
    the batch needs, not the model's context. The one-token decode step is `torch.compile`d once per
    shape on CUDA (CUDA graphs in reduce-overhead mode) and runs eagerly on a CPU. Prefill is eager.
    Decode attention runs on the key/value heads (grouped-query heads packed as extra query rows), so
    the cache is never repeated per query head. Sampling stays on the device; the host reads results
    every `sync_every` tokens. `DecodeBatch` is one running batch; `generate()` decodes a static one.
    """

    def __init__(self, model, max_len: int, *, max_batch: int = 16, batch_buckets: Sequence[int] = (1, 2, 4, 8, 16),
                 min_len: int = 512, pool_tokens: int | None = None, compile: bool = True,
                 compile_mode: str | None = "reduce-overhead", tune_single_row: bool = True,
                 sync_every: int = 16, prefill_tokens: int = 16384, attention: str = "auto", fuse: bool = True):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention {attention!r}: use one of {', '.join(ATTENTION_MODES)}")
        inner = getattr(model, "model", None)
        if inner is None or getattr(model, "lm_head", None) is None or any(
                getattr(inner, name, None) is None for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
            raise UnsupportedModel(f"{type(model).__name__} lacks model.embed_tokens/layers/norm/rotary_emb or lm_head")
        kinds = set(getattr(model.config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise UnsupportedModel(f"layer types {sorted(kinds)}: only full attention is supported")
        attn = inner.layers[0].self_attn
        if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            raise UnsupportedModel(f"{type(attn).__name__} is not a Llama-layout attention")
        self.model, self.inner, self.layers = model, inner, inner.layers
        self.heads, self.kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.n_rep = self.heads // self.kv_heads
        self.vocab = model.lm_head.weight.shape[0]
        # The model's own rotary helper when it has one (same numerics as its forward).
        self.rope = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", _apply_rope)
        self.max_len, self.max_batch = int(max_len), int(max_batch)
        self.batch_buckets = tuple(sorted({b for b in batch_buckets if 0 < b < self.max_batch} | {self.max_batch}))
        self.length_buckets = length_buckets(min_len, self.max_len)
        self.pool_tokens = int(pool_tokens or self.max_batch * self.max_len)
        self.sync_every, self.prefill_tokens = max(1, int(sync_every)), max(1, int(prefill_tokens))
        param = next(model.parameters())
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.kv_bytes_per_token = 2 * len(self.layers) * self.kv_heads * self.head_dim * param.element_size()
        self.compiled = bool(compile) and param.device.type == "cuda"
        self.compile_mode, self.tune_single_row = compile_mode, tune_single_row
        self.attention = attention
        # "auto" on CUDA: the split kernels where they take this model's heads (on an H100 +4.6% tok/s at
        # 16 rows against cuDNN's fused kernel, +12% for one row with a 3500-token cache against the
        # matrix products and equal with a short one, docs/PERFORMANCE.md); else matmul for one row and
        # packed for more.
        self._split = self._split_kernels(required=attention == "split")
        self._pool_owner: FastDecoder | None = None
        self.compile_seconds: dict[tuple[int, int], float] = {}
        self._ready: set[tuple[int, int]] = set()
        self._pool: _KVPool | None = None
        # q|k|v and gate|up as one weight each (pipelines/fused.py), sharing the parameters' memory
        self.fused = FusedProjections(self.layers, enabled=fuse, static=self.compiled)
        self._step = self._decode_step
        if self.compiled:
            raise_recompile_limit(64)  # one compiled graph per (batch, length) shape
            self._step = torch.compile(self._decode_step, mode=compile_mode, fullgraph=True, dynamic=False)

    def attention_mode(self, rows: int) -> str:
        """The decode attention a batch of `rows` rows runs: the setting, with "auto" resolved."""
        if self.attention != "auto":
            return self.attention
        return "split" if self._split else "matmul" if rows == 1 else "packed"

    def _split_kernels(self, required: bool) -> bool:
        """Registers torch.ops.genq.split_kv_attention where CUDA is (the weights may move there later)."""
        if not torch.cuda.is_available():
            return False
        try:
            from . import split_kv_attention
        except ImportError:  # no Triton: CUDA builds of torch bring it
            if required:
                raise
            return False
        if split_kv_attention.supported(self.head_dim, self.n_rep):
            return True
        if required:
            raise ValueError(f"attention 'split' needs a power-of-two head size of 16 to 128 and at most 16 query "
                             f"heads per key/value head (this model: {self.head_dim}, {self.n_rep})")
        return False

    # --- shapes -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pool(self) -> _KVPool:
        if self._pool is None:
            param = next(self.model.parameters())
            if self._pool_owner is not None:
                self._pool = self._pool_owner.pool()
            else:
                self._pool = _KVPool(len(self.layers), self.kv_heads, self.head_dim, self.pool_tokens, param.dtype,
                                     param.device, static=self.compiled)
            self._vocab_range = torch.arange(self.vocab, device=param.device)
        return self._pool

    def share_pool(self, owner: "FastDecoder") -> bool:
        """Use `owner`'s KV pool (one batch runs at a time, so two models of one geometry need one pool)."""
        mine, theirs = next(self.model.parameters()), next(owner.model.parameters())
        same = (len(self.layers), self.kv_heads, self.head_dim, self.pool_tokens, self.compiled, mine.dtype,
                mine.device) == (len(owner.layers), owner.kv_heads, owner.head_dim, owner.pool_tokens, owner.compiled,
                                 theirs.dtype, theirs.device)
        if same:
            self._pool_owner, self._pool = owner, None
        return same

    def release_memory(self) -> None:
        """Drop the pool and the fused weights (weights moving to CPU); the next batch makes them again."""
        self._pool = None
        self.fused.release()

    def reset(self) -> None:
        """After a failed batch: zero the pool so nothing a failure left behind can reach a later row."""
        if self._pool is not None:
            self._pool.zero_()

    def allowed(self, batch: int, length: int) -> bool:
        return batch in self.batch_buckets and length in self.length_buckets and batch * length <= self.pool_tokens

    def ready(self, shape: tuple[int, int]) -> bool:
        """Runs without compiling first."""
        return not self.compiled or shape in self._ready

    def cost(self, shape: tuple[int, int]) -> int:
        """Bytes one decode step reads: the weights plus every row's keys and values."""
        return self.weight_bytes + shape[0] * shape[1] * self.kv_bytes_per_token

    def shape_for(self, rows: int, need: int) -> tuple[int, int] | None:
        """The (batch, length) shape for `rows` rows needing `need` cache columns; None if none fits.
        A compiled shape within 1.5x the read cost beats compiling the smallest one mid-service."""
        fits = [(b, n) for b in self.batch_buckets if b >= rows for n in self.length_buckets
                if n >= need and b * n <= self.pool_tokens]
        if not fits:
            return None
        exact = min(fits, key=self.cost)
        ready = [s for s in fits if self.ready(s)]
        if self.ready(exact) or not ready:
            return exact
        best = min(ready, key=self.cost)
        return best if self.cost(best) <= 1.5 * self.cost(exact) else exact

    def warm(self, batch: int, length: int) -> float:
        """Compile and record the decode step of one shape now (at start-up) rather than in a job."""
        started = time.perf_counter()
        with torch.inference_mode():
            run = DecodeBatch(self, batch, length)
            run.admit([(0, DecodeRow([0], min(4, length - 1)))])
            run.sync()
            while run.active:
                run.advance()
        return time.perf_counter() - started

    # --- forward passes ----------------------------------------------------------------------

    def _qkv(self, layer, x: torch.Tensor, f, cos, sin):
        """q, k, v of x [rows, tokens, hidden] as [rows, heads, tokens, head_dim], q and k rotated."""
        rows, tokens = x.shape[:2]
        q, k, v = project_qkv(layer.self_attn, layer.input_layernorm(x), f)
        q = q.view(rows, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(rows, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(rows, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        return (*self.rope(q, k, cos, sin), v)

    def _prefill(self, ids: torch.Tensor, pads: list[int], kv: list[torch.Tensor], rows: torch.Tensor, end: int):
        """Left-padded prompts of `rows` into cache columns [end - width, end); last-position logits."""
        n, width = ids.shape
        dev = ids.device
        x = self.inner.embed_tokens(ids)
        ar = torch.arange(width, device=dev)
        pad = torch.tensor(pads, device=dev)
        cos, sin = self.inner.rotary_emb(x, (ar[None, :] - pad[:, None]).clamp(min=0))
        mask = None
        if any(pads):  # causal over real keys; a padding query sees itself (no empty softmax rows)
            allowed = (ar[None, :] <= ar[:, None])[None] & (ar[None, :] >= pad[:, None])[:, None, :]
            mask = (allowed | torch.eye(width, dtype=torch.bool, device=dev))[:, None]
        for i, (layer, f) in enumerate(zip(self.layers, self.fused.layers())):
            attn = layer.self_attn
            q, k, v = self._qkv(layer, x, f, cos, sin)
            kv[2 * i][rows, :, end - width:end] = k
            kv[2 * i + 1][rows, :, end - width:end] = v
            o = F.scaled_dot_product_attention(q, _repeat_kv(k, self.n_rep), _repeat_kv(v, self.n_rep),
                                               attn_mask=mask, is_causal=mask is None, scale=self.scaling)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(n, width, -1))
            x = x + mlp(layer.mlp, layer.post_attention_layernorm(x), f)
        return self.model.lm_head(self.inner.norm(x[:, -1:]))[:, 0].float()

    def _decode_step(self, tokens, positions, column, mask, kv: list[torch.Tensor], fused):
        """One token per row at cache column `column`; logits [rows, vocab] in fp32. Compiled per shape.
        `fused` (FusedProjections.layers) is an argument, not state read from self: its tensors are the
        graphs' static inputs, whose addresses CUDA graph trees compare before every replay, so after a
        weight move and rebuild a graph re-records instead of reading freed memory (no recompile: the
        addresses are unguarded, as the KV pool's)."""
        b = tokens.shape[0]
        x = self.inner.embed_tokens(tokens[:, None])
        cos, sin = self.inner.rotary_emb(x, positions[:, None])
        keep = mask[:, None, None, :]
        mode = self.attention_mode(b)
        attend = {"packed": packed_attention, "matmul": matmul_attention, "split": split_attention}.get(mode)
        for i, (layer, f) in enumerate(zip(self.layers, fused)):
            attn = layer.self_attn
            q, k, v = self._qkv(layer, x, f, cos, sin)
            keys, values = kv[2 * i], kv[2 * i + 1]
            keys.index_copy_(2, column, k)
            values.index_copy_(2, column, v)
            if attend is not None:
                # Query heads sharing a key/value head become that head's query rows: no repeated cache.
                q = q.reshape(b, self.kv_heads, self.n_rep, self.head_dim)
                o = attend(q, keys, values, keep, self.scaling)
            else:  # transformers' compiled decode: the cache repeated per query head
                o = F.scaled_dot_product_attention(q, _repeat_kv(keys, self.n_rep), _repeat_kv(values, self.n_rep),
                                                   attn_mask=keep, scale=self.scaling)
            x = x + attn.o_proj(o.reshape(b, 1, self.heads * self.head_dim))
            x = x + mlp(layer.mlp, layer.post_attention_layernorm(x), f)
        return self.model.lm_head(self.inner.norm(x))[:, 0].float()

    def decode(self, tokens, positions, column, mask, kv, shape: tuple[int, int]) -> torch.Tensor:
        fused = self.fused.layers(check_all=False)  # weights move only between batches; prefill checks all
        if not self.compiled:
            return self._decode_step(tokens, positions, column, mask, kv, fused)
        torch.compiler.cudagraph_mark_step_begin()
        if shape in self._ready:
            return self._step(tokens, positions, column, mask, kv, fused)
        started = time.perf_counter()
        # One row: inductor turns the matrix-vector products into tuned fused reductions (gpt-fast's lever).
        tune = self.tune_single_row and shape[0] == 1
        import torch._inductor.config as inductor_config

        with inductor_config.patch(coordinate_descent_tuning=True) if tune else contextlib.nullcontext():
            logits = self._step(tokens, positions, column, mask, kv, fused)
        self._ready.add(shape)
        self.compile_seconds[shape] = round(time.perf_counter() - started, 1)
        return logits

    # --- a static batch -----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: Sequence[int] | int,
                 sampling: Sampling | Sequence[Sampling] | None = None, eos_token_ids: Sequence[int] = (),
                 pad_token_id: int = 0, on_first_token: Callable[[], None] | None = None) -> list[list[int]]:
        """Left-padded rows decoded together; each row's new ids, up to and including its end-of-text id."""
        ids, keep = input_ids.cpu(), attention_mask.cpu().bool()
        n = ids.shape[0]
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
        rules = [sampling or GREEDY] * n if sampling is None or isinstance(sampling, Sampling) else list(sampling)
        rows = [DecodeRow(ids[i][keep[i]].tolist(), limits[i], rules[i]) for i in range(n)]
        need = max(len(r.prompt) for r in rows) + max(limits)
        shape = self.shape_for(n, need)
        if shape is None:
            raise ValueError(f"{n} rows needing {need} cache columns exceed the decoder's cache "
                             f"({self.max_len} per row, {self.pool_tokens} in all)")
        run = DecodeBatch(self, *shape, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
        run.admit(list(enumerate(rows)))
        if on_first_token is not None:
            on_first_token()
        run.sync()
        while run.active:
            run.advance()
        stops = set(eos_token_ids)
        return [_through_first(run.slots[i].tokens, stops) for i in range(n)]


def packed_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """Decode attention as one fused kernel (SDPA), same arguments and result as `matmul_attention`."""
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, scale=scaling)


def split_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """Decode attention split over the cache length (pipelines/split_kv_attention.py's Triton kernels,
    registered by FastDecoder on CUDA); elsewhere the same computation as `matmul_attention`."""
    if q.is_cuda:
        return torch.ops.genq.split_kv_attention(q, keys, values, keep, scaling)
    return matmul_attention(q, keys, values, keep, scaling)


def matmul_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """Decode attention as matrix products: q [rows, kv heads, queries, head dim] over the cache where
    `keep` [rows, 1, 1, positions] is true; [rows, kv heads, queries, head dim]. The fused kernels are
    built for long query blocks and run one thread block per head for one row (on an H200 0.70 ms of a
    5.2 ms step against 0.2 ms for the products, bench/qwen_profile.py): "auto" uses this for one row
    where the split kernels do not run; batches then keep the fused kernel, a block per row and head."""
    # Scores in fp32, as the fused kernels keep them: bf16 scores flipped more near-tied greedy
    # picks on the GPU (214 of 256 steps agreeing with the uncached forward, against 223-229).
    scores = attention_scores(q, keys) * scaling
    weights = scores.masked_fill(~keep, float("-inf")).softmax(-1).to(values.dtype)
    return torch.matmul(weights, values)


def attention_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [rows, kv heads, queries, head dim] against keys [rows, kv heads, positions, head dim], in fp32."""
    return torch.matmul(q.float(), keys.transpose(-1, -2).float())


def _through_first(tokens: list[int], stops: set[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in stops:
            return tokens[: i + 1]
    return list(tokens)
