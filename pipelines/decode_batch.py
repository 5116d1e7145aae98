"""One running batch of the chat engine's decoder: rows (`DecodeRow`, each with its `Sampling` rule) join
it, decode together one token a step through `FastDecoder.decode` (pipelines/decoder.py), are read back
at sync points and leave. Sampling, penalties and the end-of-text and length checks run on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .decoder import FastDecoder


@dataclass(frozen=True)
class Sampling:
    """One row's decoding rule; every field means what it means to transformers' generate().

    temperature 0 is greedy; top_k 0 is off; repetition_penalty is transformers' multiplicative penalty
    over prompt and output; presence/frequency are OpenAI's, over the output only. A sampled row draws
    its uniforms from torch.Generator().manual_seed(seed) on the CPU, one per token, so what else is in
    the batch never changes its draws.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0


GREEDY = Sampling()


@dataclass(frozen=True)
class DecodeRow:
    prompt: Sequence[int]
    max_new_tokens: int
    sampling: Sampling = GREEDY


@dataclass
class _Slot:
    prompt_len: int
    start: int  # cache column of the row's first generated token
    max_new: int
    sampling: Sampling
    tokens: list[int] = field(default_factory=list)  # generated so far, as of the last sync
    done: bool = False


@dataclass(frozen=True)
class _Work:
    """Which sampling stages the rows in the batch need (decided on the host, no sync)."""

    repetition: bool = False
    openai: bool = False
    sample: bool = False
    top_p: bool = False
    kmax: int = 0


class DecodeBatch:
    """One running batch of a (rows, length) shape. Slots are rows; a slot is filled by `admit` (prefill
    into the pool, first token sampled), decoded by `step`, read back by `sync`, freed by `release`.

    All rows write the same cache column each step; a row admitted at column c has its prompt in the
    columns just before c, so rows can join a running batch while c >= their prompt length and
    c + max_new_tokens <= length. Every per-row state lives on the device, allocated for the decoder's
    max_batch rows so that `grow` to a larger batch bucket moves nothing.
    """

    def __init__(self, decoder: FastDecoder, batch: int, length: int, *, eos_token_ids: Sequence[int] = (),
                 pad_token_id: int = 0, suppress_token_ids: Sequence[int] = ()):
        if not decoder.allowed(batch, length):
            raise ValueError(f"shape {batch}x{length} is not one of the decoder's buckets")
        d = self.decoder = decoder
        self.B, self.L = batch, length
        self.kv = d.pool().views(batch, length)
        dev, rows, vocab = d.device, d.max_batch, d.vocab
        self.pad = int(pad_token_id)
        self.eos = torch.tensor(sorted(set(eos_token_ids)) or [-1], device=dev)
        self.suppress = None
        if suppress_token_ids:
            self.suppress = torch.zeros(vocab, dtype=torch.bool, device=dev)
            self.suppress[torch.tensor(sorted(set(suppress_token_ids)), device=dev)] = True

        def full(value, *shape, dtype=torch.long):
            return torch.full(shape or (rows,), value, dtype=dtype, device=dev)
        self.mask = full(False, rows, length, dtype=torch.bool)
        self.hist = full(self.pad, rows, length + 1)  # hist[r, c]: the token whose keys go to column c
        self.tok, self.pos, self.gen, self.limit = full(self.pad), full(0), full(0), full(0)
        self.done = full(True, dtype=torch.bool)
        self.seen = full(False, rows, vocab, dtype=torch.bool)  # prompt + output, repetition penalty
        self.counts = full(0.0, rows, vocab, dtype=torch.float32)  # output only, OpenAI penalties
        self.temp, self.top_p_cut = full(1.0, dtype=torch.float32), full(0.0, dtype=torch.float32)
        self.top_k = full(vocab)
        self.rep, self.pres, self.freq = (full(v, dtype=torch.float32) for v in (1.0, 0.0, 0.0))
        self.sampled = full(False, dtype=torch.bool)
        self.uniform = full(0.0, rows, length, dtype=torch.float32)
        self.rows = torch.arange(rows, device=dev)
        self.column: int | None = None  # the column the next decode step writes
        self.col_t = full(0, 1)
        self.slots: dict[int, _Slot] = {}
        self.work = _Work()

    @property
    def active(self) -> bool:
        """Some admitted row has not finished, as of the last sync."""
        return any(not s.done for s in self.slots.values())

    def free_slots(self) -> list[int]:
        return [s for s in range(self.B) if s not in self.slots]

    def grow_target(self) -> int | None:
        """The next batch bucket this batch can grow to without compiling, if any."""
        bigger = [b for b in self.decoder.batch_buckets if b > self.B and self.decoder.allowed(b, self.L)
                  and self.decoder.ready((b, self.L))]
        return min(bigger) if bigger else None

    def grow(self, batch: int) -> None:
        if not self.decoder.allowed(batch, self.L) or batch < self.B:
            raise ValueError(f"cannot grow {self.B}x{self.L} to {batch} rows")
        self.B, self.kv = batch, self.decoder.pool().views(batch, self.L)

    def can_join(self, row: DecodeRow) -> bool:
        return self.column is not None and 1 <= len(row.prompt) <= self.column \
            and self.column + row.max_new_tokens <= self.L

    # --- admission ----------------------------------------------------------------------------

    def admit(self, rows: Sequence[tuple[int, DecodeRow]]) -> None:
        """Prefill rows into free slots and sample their first tokens (read back at the next sync)."""
        if not rows:
            return
        if self.column is None:
            self.column = max(len(r.prompt) for _, r in rows)
            self.col_t.fill_(self.column)
        start, dev, vocab = self.column, self.decoder.device, self.decoder.vocab
        for slot, row in rows:
            if not 0 <= slot < self.B or slot in self.slots:
                raise ValueError(f"slot {slot} is not free")
            if row.max_new_tokens < 1 or not self.can_join(row):
                raise ValueError(f"a row of {len(row.prompt)} + {row.max_new_tokens} tokens does not fit "
                                 f"column {start} of a {self.L}-column cache")
        idx = torch.tensor([slot for slot, _ in rows], device=dev)
        rules = [r.sampling for _, r in rows]

        def put(target, values, dtype=torch.float32):
            target[idx] = torch.tensor(values, dtype=dtype).to(dev)
        put(self.temp, [s.temperature if s.temperature > 0 else 1.0 for s in rules])
        put(self.sampled, [s.temperature > 0 for s in rules], torch.bool)
        put(self.top_p_cut, [1.0 - s.top_p for s in rules])  # transformers compares with 1 - top_p
        put(self.top_k, [min(s.top_k, vocab) if s.top_k > 0 else vocab for s in rules], torch.long)
        put(self.rep, [s.repetition_penalty for s in rules])
        put(self.pres, [s.presence_penalty for s in rules])
        put(self.freq, [s.frequency_penalty for s in rules])
        put(self.limit, [r.max_new_tokens for _, r in rows], torch.long)
        put(self.pos, [len(r.prompt) for _, r in rows], torch.long)
        self.gen[idx] = 0
        self.done[idx] = False
        self.counts[idx] = 0.0
        width = max(len(r.prompt) for _, r in rows)
        cols, ids = torch.zeros(len(rows), self.L, dtype=torch.bool), torch.full((len(rows), width), self.pad)
        uniform = torch.zeros(len(rows), self.L)
        for i, (_, row) in enumerate(rows):
            cols[i, start - len(row.prompt):start] = True
            ids[i, width - len(row.prompt):] = torch.tensor(list(row.prompt))
            if row.sampling.temperature > 0:
                uniform[i] = torch.rand(self.L, generator=torch.Generator().manual_seed(row.sampling.seed))
        self.mask[idx] = cols.to(dev)
        self.uniform[idx] = uniform.to(dev)
        ids = ids.to(dev)
        real = (torch.arange(width, device=dev)[None, :] >= torch.tensor(
            [width - len(r.prompt) for _, r in rows], device=dev)[:, None]).float()
        hits = torch.zeros(len(rows), vocab + 1, device=dev).scatter_add_(1, ids.clamp(max=vocab), real)
        self.seen[idx] = hits[:, :vocab] > 0
        for slot, row in rows:
            self.slots[slot] = _Slot(len(row.prompt), start, row.max_new_tokens, row.sampling)
        self._plan()
        chunk: list[int] = []
        for i in range(len(rows)):  # prefill in forwards of at most prefill_tokens padded tokens
            grown = max(len(rows[j][1].prompt) for j in chunk + [i]) * (len(chunk) + 1)
            if chunk and grown > self.decoder.prefill_tokens:
                self._prefill([rows[j] for j in chunk])
                chunk = []
            chunk.append(i)
        self._prefill([rows[j] for j in chunk])

    def _prefill(self, rows: Sequence[tuple[int, DecodeRow]]) -> None:
        width = max(len(r.prompt) for _, r in rows)
        ids = torch.full((len(rows), width), self.pad)
        pads = [width - len(r.prompt) for _, r in rows]
        for i, (_, row) in enumerate(rows):
            ids[i, pads[i]:] = torch.tensor(list(row.prompt))
        idx = torch.tensor([slot for slot, _ in rows], device=self.decoder.device)
        logits = self.decoder._prefill(ids.to(self.decoder.device), pads, self.kv, idx, self.column)
        self._accept(idx, self._pick(logits, idx), self.column)

    def release(self, slot: int) -> None:
        """Free a slot (finished, stopped on the host, or cancelled): it decodes padding from now on."""
        if self.slots.pop(slot, None) is not None:
            self.done[slot] = True
            self._plan()

    def _plan(self) -> None:
        rules = [s.sampling for s in self.slots.values()]
        sampled = [s for s in rules if s.temperature > 0]
        kmax = max((s.top_k if 0 < s.top_k < self.decoder.vocab else self.decoder.vocab for s in sampled), default=0)
        self.work = _Work(repetition=any(s.repetition_penalty != 1.0 for s in rules),
                          openai=any(s.presence_penalty or s.frequency_penalty for s in rules),
                          sample=bool(sampled), top_p=any(s.top_p < 1.0 for s in sampled), kmax=kmax)

    # --- decoding -----------------------------------------------------------------------------

    def _pick(self, logits: torch.Tensor, rows) -> torch.Tensor:
        """Next token per row: generate()'s processors in its order (repetition penalty, suppressed ids,
        OpenAI penalties), then argmax, or temperature, top-k, top-p and an inverse-CDF draw."""
        s, work = logits, self.work
        if work.repetition:
            pen = self.rep[rows][:, None]
            s = torch.where(self.seen[rows], torch.where(s < 0, s * pen, s / pen), s)
        if self.suppress is not None:
            s = s.masked_fill(self.suppress, float("-inf"))
        if work.openai:
            counts = self.counts[rows]
            s = s - self.freq[rows][:, None] * counts - self.pres[rows][:, None] * (counts > 0).to(s.dtype)
        greedy = s.argmax(dim=-1)
        if not work.sample:
            return greedy
        t = s / self.temp[rows][:, None]
        if work.kmax < self.decoder.vocab:
            vals, cand = t.topk(work.kmax, dim=-1)
        else:
            vals, cand = t.sort(dim=-1, descending=True)
        vals = vals.masked_fill(self.decoder._vocab_range[: vals.shape[1]] >= self.top_k[rows][:, None], float("-inf"))
        if work.top_p:
            # transformers: ascending cumulative probability <= 1 - top_p is dropped; the top token stays.
            tail = vals.softmax(dim=-1).flip(-1).cumsum(dim=-1).flip(-1)
            drop = tail <= self.top_p_cut[rows][:, None]
            drop[:, 0] = False
            vals = vals.masked_fill(drop, float("-inf"))
        probs = vals.softmax(dim=-1)
        cdf = probs.cumsum(dim=-1)
        u = self.uniform[rows].gather(1, self.gen[rows][:, None].clamp(max=self.L - 1))
        j = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        # Never past the last token with probability (nor below 0 if a row's logits were NaN: an
        # out-of-range index would be a device-side assert, fatal to the process's CUDA context).
        j = torch.minimum(j, (probs > 0).sum(dim=-1, keepdim=True) - 1).clamp(min=0)
        return torch.where(self.sampled[rows], cand.gather(1, j)[:, 0], greedy)

    def _accept(self, rows, token: torch.Tensor, column: int) -> None:
        """Record each row's new token (padding for finished rows) written at hist column `column`."""
        live = ~self.done[rows]
        token = torch.where(live, token, self.pad)
        self.hist[rows, column] = token
        self.tok[rows] = token
        gen = self.gen[rows] + live
        self.gen[rows] = gen
        self.done[rows] = ~live | torch.isin(token, self.eos) | (gen >= self.limit[rows])
        # Kept up only while a row needs them: a row's own state starts at its admission (prompt ids
        # in `seen`, zero counts), and rows without the penalty multiply stale entries by neutral values.
        pairs = self.rows[rows]
        if self.work.repetition:
            self.seen[pairs, token] = True
        if self.work.openai:
            self.counts[pairs, token] += live.float()

    def step(self) -> None:
        """One decode step for every row (finished and empty rows decode padding)."""
        b, c = self.B, self.column
        self.mask[:b, c] = True
        logits = self.decoder.decode(self.tok[:b], self.pos[:b], self.col_t, self.mask[:b], self.kv, (b, self.L))
        token = self._pick(logits, slice(0, b))
        self.pos[:b] += 1
        self._accept(slice(0, b), token, c + 1)
        self.column = c + 1
        self.col_t += 1

    def sync(self) -> list[int]:
        """Read new tokens and finished flags back (one device-to-host copy); the slots that changed."""
        live = [s for s, slot in self.slots.items() if not slot.done]
        if not live:
            return []
        lo = min(self.slots[s].start + len(self.slots[s].tokens) for s in live)
        b = self.B
        data = torch.cat([self.gen[:b, None], self.done[:b, None].long(), self.hist[:b, lo:self.column + 1]],
                         dim=1).tolist()
        changed = []
        for s in live:
            slot, row = self.slots[s], data[s]
            if row[0] > len(slot.tokens):
                slot.tokens.extend(row[2 + slot.start + len(slot.tokens) - lo: 2 + slot.start + row[0] - lo])
                changed.append(s)
            if row[1]:
                slot.done = True
                if s not in changed:
                    changed.append(s)
        return changed

    def launch(self) -> int:
        """Queue the steps up to the next sync point (sync_every tokens, or the first row limit); no wait."""
        live = [s for s in self.slots.values() if not s.done]
        if not live:
            return 0
        steps = max(1, min(self.decoder.sync_every, min(s.max_new - len(s.tokens) for s in live)))
        for _ in range(steps):
            self.step()
        return steps

    def advance(self) -> list[int]:
        """Decode to the next sync point and read the results back."""
        return self.sync() if self.launch() else []
