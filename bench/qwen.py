"""Qwen 2.5 7B: generate() with the default cache against the batching engine (pipelines/chat_batch.py
on pipelines.decoder.FastDecoder), same process, same card.

    python -m bench.qwen [--tiny] [--runs 3] [--prompt-tokens 300] [--new-tokens 256] [--batch 16]
                         [--compile-mode reduce-overhead] [--no-tune-single-row] [--attention auto|packed|matmul|split|repeat]
                         [--weights fp8] [--budget-s 290] [--out DIR]

Stages: build; baseline generate() at 1 stream, its time to first token, at --batch streams; the
engine's start-up (KV pool, compile of the --batch-row decode shape); the engine at --batch streams
(--batch threads submitting at once, as the daemon's worker threads do): total tokens/s, per-request
latency, time to first token; compile of the 1-row shape; the engine at 1 stream; equality (greedy
engine output against the argmax of a full uncached forward at every step); optional: the decoder's
static batch without the engine thread, --batch streams with Qwen Instruct's sampling settings,
staggered arrivals (rows joining a running batch), a memory grid. With `--weights fp8` the model is then
quantised in place (pipelines/fp8_linear.py, GENQ_CHAT_WEIGHTS=fp8) and the engine's stages run again
(suffix `_fp8`; the optional stages and the memory grid are left out), followed by `fp8_difference`:
the FP8 model's logits against the bf16 model's over the same sequence (the prompt and the bf16
engine's greedy tokens, teacher-forced), and how far the two engines' greedy tokens agree.
"""
from __future__ import annotations

import statistics
import threading
import time

import torch

from bench.harness import (Report, bandwidth_tb_s, compare, decode_read_bytes, memory, parse_args, ratio, reset_memory,
                           sync, timed)
from bench.models import build_qwen
from pipelines.decode_batch import DecodeBatch, DecodeRow, Sampling
from pipelines.decoder import FastDecoder, length_buckets
from pipelines.chat_batch import BatchEngine, BatchOptions, EngineModel, RowRequest
from pipelines.chat_options import ATTENTION_MODES


def _stats(values: list[float]) -> dict:
    return {"min": round(min(values), 4), "median": round(statistics.median(values), 4),
            "max": round(max(values), 4)}


class CanaryReport(Report):
    """A Report that checks, after every stage, 100,000 strings made at its start.

    Twice after the bf16 engine (ninth and tenth sessions) a module path lost its last character while the
    FP8 rewrite replaced layers, and in the eleventh one string of these changed by the end of the rewrite:
    host memory is overwritten somewhere in this process. Checking after each stage tells which stage does
    it (`canary`: the first stage after which strings differ, how many, and three of them as they read)."""

    COUNT = 100_000

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.canary = self._strings()
        self.data["canary"] = {"strings": self.COUNT, "changed_after": None}

    @classmethod
    def _strings(cls) -> list[str]:
        return [f"model.layers.{i}.mlp.down_proj" for i in range(cls.COUNT)]

    def stage(self, name, fn, optional_cost_s=None):
        result = super().stage(name, fn, optional_cost_s)
        if self.data["canary"]["changed_after"] is None:
            changed = [(i, a) for i, (a, b) in enumerate(zip(self.canary, self._strings())) if a != b]
            if changed:
                self["canary"] = {**self.data["canary"], "changed_after": name, "changed": len(changed),
                                  "examples": [[i, repr(a)] for i, a in changed[:3]]}
        return result


def fp8_weights(rep: Report, model, dev: str) -> bool:
    """Quantise the model in place, as the daemon does with GENQ_CHAT_WEIGHTS=fp8; False if that failed."""
    from pipelines.fp8_linear import quantise_model

    def quantise():
        sync(dev)
        t0 = time.perf_counter()
        replaced = quantise_model(model)
        sync(dev)
        return {"replaced_layers": replaced, "quantise_s": round(time.perf_counter() - t0, 2),
                "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), **memory(dev)}

    return rep.stage("fp8_quantise", quantise) is not None


def fp8_difference(st: dict, model) -> dict:
    """The FP8 model against the bf16 one over the bf16 engine's sequence (teacher-forced): logits rel. L2,
    how often the top-1 token is the same, and how far the two engines' greedy tokens agree."""
    seq, ref = st["bf16_seq"], st["bf16_full"]
    width = seq.shape[1] - ref.shape[0]
    with torch.no_grad():
        got = model(input_ids=seq).logits[0, width - 1:-1].float()
    top1 = got.argmax(-1) == ref.argmax(-1)
    in_top5 = (got.topk(5, dim=-1).indices == ref.argmax(-1)[:, None]).any(-1)
    a, b = st.get("tokens", []), st.get("tokens_fp8", [])
    return {"positions": ref.shape[0], "logits": compare(ref, got),
            "top1_agreement": round(float(top1.float().mean()), 4),
            "bf16_top1_in_fp8_top5": round(float(in_top5.float().mean()), 4),
            "greedy_tokens_equal_before_first_difference": next(
                (i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))),
            "note": "random weights: near-tied logits everywhere, so top-1 agreement understates a trained model's"}


def main() -> None:
    args = parse_args(__doc__, lambda ap: (ap.add_argument("--prompt-tokens", type=int, default=300),
                                           ap.add_argument("--new-tokens", type=int, default=256),
                                           ap.add_argument("--batch", type=int, default=16),
                                           ap.add_argument("--no-tune-single-row", action="store_true",
                                                           help="no coordinate-descent tuning of the 1-row graph"),
                                           ap.add_argument("--attention", default="auto",
                                                           choices=ATTENTION_MODES),
                                           ap.add_argument("--hf-static", action="store_true",
                                                           help="also time generate(cache_implementation='static')"),
                                           ap.add_argument("--weights", default="as-loaded",
                                                           choices=("as-loaded", "fp8"),
                                                           help="fp8: the engine again with FP8 weights")))
    dev = args.device
    if args.tiny:
        args.prompt_tokens, args.new_tokens, args.batch = 12, 8, 3
    rep = CanaryReport("qwen", args)
    st: dict = {}

    def build():
        reset_memory(dev)
        t0 = time.perf_counter()
        st["model"] = build_qwen(dev, tiny=args.tiny)
        sync(dev)
        return {"build_s": round(time.perf_counter() - t0, 1), **memory(dev),
                "params_b": round(sum(p.numel() for p in st["model"].parameters()) / 1e9, 3)}

    rep.stage("build", build)
    model = st["model"]
    vocab = model.config.vocab_size
    read = decode_read_bytes(model)  # as built (bf16), before any FP8 stage
    gen = torch.Generator(dev).manual_seed(0)
    n_new, width, streams = args.new_tokens, args.prompt_tokens, args.batch

    def prompt(batch: int):
        ids = torch.randint(100, vocab, (batch, width), device=dev, generator=gen)
        return ids, torch.ones_like(ids)

    ids1, mask1 = prompt(1)
    idsb, maskb = prompt(streams)

    def hf(ids, mask, new=n_new, **kw):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, **kw)

    def tok_s(res: dict, batch: int) -> dict:
        res["tokens_per_s"] = round(batch * n_new / res["min_s"], 1)
        res["tokens_per_s_median"] = round(batch * n_new / res["median_s"], 1)
        return res

    rep.stage("baseline_1stream", lambda: tok_s(timed(lambda: hf(ids1, mask1), dev, args.runs), 1))
    rep.stage("baseline_ttft", lambda: timed(lambda: hf(ids1, mask1, new=1), dev, 5))
    rep.stage(f"baseline_{streams}streams", lambda: tok_s(timed(lambda: hf(idsb, maskb), dev, 2), streams))
    if args.hf_static:
        rep.stage("hf_static_1stream", lambda: tok_s(timed(lambda: hf(ids1, mask1, cache_implementation="static"),
                                                           dev, args.runs), 1), optional_cost_s=120)

    # --- the engine, configured as the daemon would be for this workload ------------------------
    context = min(int(model.config.max_position_embeddings), 32768)
    length = next(n for n in length_buckets(512, context) if n >= width + n_new)
    opts = BatchOptions(enabled=True, max_batch=streams, window_ms=2.0, cache_tokens=streams * length,
                        compile=dev.startswith("cuda"), compile_mode=args.compile_mode or "reduce-overhead",
                        tune_single_row=not args.no_tune_single_row, attention=args.attention,
                        warmup=((streams, length),))

    def run_engine(tag: str) -> None:
        """The engine's stages on the model as it is now; stage names end with `tag`."""

        def engine_setup():
            reset_memory(dev)
            decoder = opts.decoder(model, context)
            st["decoder"] = decoder
            st["engine"] = engine = BatchEngine({"qwen": EngineModel(decoder)}, opts).start()
            t0 = time.perf_counter()
            spent = engine.warm_up()
            sync(dev)
            return {"warm_up_s": round(time.perf_counter() - t0, 1), "compile_s": spent, "cache_length": length,
                    "pool_tokens": decoder.pool_tokens, "kv_pool_gib": round(decoder.pool_tokens *
                                                                             decoder.kv_bytes_per_token / 2**30, 3),
                    "compile_mode": opts.compile_mode if decoder.compiled else "eager",
                    "tune_single_row": opts.tune_single_row, "attention": opts.attention,
                    "weights_gb": round(decoder.weight_bytes / 1e9, 3), **memory(dev)}

        st.pop("engine", None)
        rep.stage(f"engine_setup{tag}", engine_setup)
        engine: BatchEngine | None = st.get("engine")
        if engine is None:
            return
        try:
            engine_stages(engine, tag)
        finally:
            engine.close()
            st["decoder"].release_memory()

    rows1 = [RowRequest("qwen", DecodeRow(ids1[0].tolist(), n_new))]
    rowsb = [RowRequest("qwen", DecodeRow(r.tolist(), n_new)) for r in idsb]

    def engine_stages(engine: BatchEngine, tag: str) -> None:

        def concurrent(rows: list[RowRequest], gap_s: float = 0.0) -> dict:
            """len(rows) threads released together (or gap_s apart), each submitting one row, as the daemon's
            worker threads do; wall clock from the release to the last result."""
            out: list = [None] * len(rows)
            gate = threading.Barrier(len(rows) + 1)

            def worker(i: int) -> None:
                gate.wait()
                if gap_s:
                    time.sleep(i * gap_s)  # load generation: arrivals spread over time
                t0 = time.perf_counter()
                result = engine.submit(rows[i])
                out[i] = (result, time.perf_counter() - t0)
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(rows))]
            for t in threads:
                t.start()
            gate.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            assert all(len(r.token_ids) == n_new for r, _ in out), "a row ended early"
            return {"wall_s": wall, "latency_s": [s for _, s in out],
                    "ttft_s": [r.queued_s + r.ttft_s for r, _ in out], "queued_s": [r.queued_s for r, _ in out],
                    "batch_sizes": sorted({r.batch_size for r, _ in out}), "shapes": sorted({r.shape for r, _ in out})}

        def engine_stage(rows: list[RowRequest], runs: int, gap_s: float = 0.0) -> dict:
            concurrent(rows, gap_s)  # warm-up run
            sync(dev)
            reset_memory(dev)
            got = [concurrent(rows, gap_s) for _ in range(runs)]
            walls = [g["wall_s"] for g in got]
            best = got[walls.index(min(walls))]
            return {"times_s": [round(w, 4) for w in walls], "min_s": round(min(walls), 4),
                    "median_s": round(statistics.median(walls), 4),
                    "tokens_per_s": round(len(rows) * n_new / min(walls), 1),
                    "tokens_per_s_median": round(len(rows) * n_new / statistics.median(walls), 1),
                    "latency_s": _stats(best["latency_s"]), "ttft_s": _stats(best["ttft_s"]),
                    "queued_s": _stats(best["queued_s"]), "batch_sizes": best["batch_sizes"],
                    "shapes": [list(s) for s in best["shapes"]], **memory(dev)}

        # The full batch first (its shape was compiled in engine_setup), then the 1-row shape's compile
        # (coordinate-descent tuned: the longest) and 1 stream. Without that compile a single request
        # would run in the full-batch graph (shape_for's 1.5x rule), so engine_1stream records its shape.
        rep.stage(f"engine_{streams}streams{tag}", lambda: engine_stage(rowsb, args.runs))

        def warm_single_row():
            t0 = time.perf_counter()
            seconds = engine.run_exclusive(lambda _: st["decoder"].warm(1, length))
            return {"compile_s": round(seconds, 1), "stage_s": round(time.perf_counter() - t0, 1)}

        rep.stage(f"engine_compile_1row{tag}", warm_single_row)
        rep.stage(f"engine_1stream{tag}", lambda: engine_stage(rows1, args.runs))

        def check():
            decoder: FastDecoder = st["decoder"]
            got = engine.submit(rows1[0]).token_ids
            st[f"tokens{tag}"] = got

            def prefill(_):
                run = DecodeBatch(decoder, 1, length)
                return decoder._prefill(ids1, [0], run.kv, torch.zeros(1, dtype=torch.long, device=dev), width)
            first_logits = engine.run_exclusive(prefill).float()
            # Random weights leave near-ties between the top logits, so two correct decoders part ways
            # after a few tokens; what must hold is that each cached step picks the token a full
            # uncached forward over the same sequence picks.
            seq = torch.cat([ids1, torch.tensor([got], device=dev)], dim=1)
            with torch.no_grad():
                full = model(input_ids=seq).logits[0, width - 1:-1].float()
                reference = model(input_ids=ids1, attention_mask=mask1).logits[:, -1].float()
            if not tag:
                st["bf16_seq"], st["bf16_full"] = seq, full
            top2 = full.topk(2, dim=-1).values
            agree = full.argmax(-1).tolist()
            disagree = [i for i, (a, b) in enumerate(zip(agree, got)) if a != b]
            margins = [float(top2[i, 0] - top2[i, 1]) for i in disagree]
            return {"of": len(got), "cached_step_equals_full_forward_argmax": len(got) - len(disagree),
                    "disagreements_top2_margin": [round(m, 4) for m in margins][:20],
                    "disagreements_max_margin": round(max(margins), 4) if margins else 0.0,
                    "prefill_logits": compare(reference, first_logits),
                    "tolerance": {"prefill_logits.rel_l2": 1e-2}}

        rep.stage(f"equality{tag}", check)
        if args.weights == "fp8":  # the device time goes to the FP8 engine's stages instead
            return

        def static_batch():
            decoder: FastDecoder = st["decoder"]
            return tok_s(timed(lambda: engine.run_exclusive(lambda _: decoder.generate(idsb, maskb, n_new)),
                               dev, args.runs), streams)

        rep.stage(f"decoder_{streams}streams_static", static_batch, optional_cost_s=30)
        # Qwen 2.5 Instruct's own sampling settings on every row: the cost of sampling on the device.
        chat_rule = [Sampling(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, seed=i)
                     for i in range(streams)]
        rows_sampled = [RowRequest("qwen", DecodeRow(r.row.prompt, n_new, rule)) for r, rule in zip(rowsb, chat_rule)]
        rep.stage(f"engine_{streams}streams_sampled", lambda: engine_stage(rows_sampled, 2), optional_cost_s=30)
        # Arrivals 20 ms apart: later rows join the running batch at sync points (continuous batching).
        rep.stage(f"engine_{streams}streams_staggered", lambda: engine_stage(rowsb, 1, gap_s=0.02),
                  optional_cost_s=30)

    run_engine("")

    def memory_grid():
        rows = []
        for batch in (1, 4, 16):
            for ctx in ((16, 32) if args.tiny else (512, 2048, 8192)):
                cache = next(n for n in length_buckets(512, context) if n >= ctx + 4)
                d = FastDecoder(model, context, max_batch=batch, pool_tokens=batch * cache, compile=False)
                ids = torch.randint(100, vocab, (batch, ctx), device=dev, generator=gen)
                reset_memory(dev)
                resident = memory(dev).get("allocated_gib")
                d.generate(ids, torch.ones_like(ids), 4)
                sync(dev)
                rows.append({"family": "qwen", "path": "fastdecoder_eager", "batch": batch, "context_tokens": ctx,
                             "cache_tokens": cache, "resident_gib": resident, **memory(dev)})
                del d
        return rows

    if args.weights != "fp8":
        rep.stage("memory_grid", memory_grid, optional_cost_s=60)
    elif fp8_weights(rep, model, dev):  # else no FP8 stage: a model left half quantised is not the FP8 one
        run_engine("_fp8")
        rep.stage("fp8_difference", lambda: fp8_difference(st, model))
    s = rep.data["stages"]
    e1, eb = s.get("engine_1stream") or {}, s.get(f"engine_{streams}streams") or {}
    bandwidth = bandwidth_tb_s(rep.data["env"].get("card", ""))
    fraction = round(e1["tokens_per_s"] * read / (bandwidth * 1e12), 3) if bandwidth and e1 else None
    f1, fb = s.get("engine_1stream_fp8") or {}, s.get(f"engine_{streams}streams_fp8") or {}
    summary = {
        "speedup_1stream": ratio(s.get("baseline_1stream"), s.get("engine_1stream")),
        f"speedup_{streams}streams": ratio(s.get(f"baseline_{streams}streams"), s.get(f"engine_{streams}streams")),
        "engine_1stream_tok_s": e1.get("tokens_per_s"), f"engine_{streams}streams_tok_s": eb.get("tokens_per_s"),
        "engine_1stream_ttft_s": (e1.get("ttft_s") or {}).get("min"),
        f"engine_{streams}streams_ttft_median_s": (eb.get("ttft_s") or {}).get("median"),
        f"engine_{streams}streams_latency_median_s": (eb.get("latency_s") or {}).get("median"),
        "compile_s": {**((s.get("engine_setup") or {}).get("compile_s") or {}),
                      "qwen:1row": (s.get("engine_compile_1row") or {}).get("compile_s")},
        "hf_static_1stream_tok_s": (s.get("hf_static_1stream") or {}).get("tokens_per_s"),
        "decode_read_gb": round(read / 1e9, 2), "card_bandwidth_tb_s": bandwidth,
        "engine_1stream_bandwidth_fraction": fraction,  # the target: 0.7
        "targets": {"1stream_tok_s": round(0.7 * bandwidth * 1e12 / read, 1) if bandwidth else None,
                    f"{streams}streams_tok_s": 2500},
    }
    if f1 or fb:  # FP8 weights: ratios against the same baseline, and against the bf16 engine
        summary["fp8"] = {
            "engine_1stream_tok_s": f1.get("tokens_per_s"), f"engine_{streams}streams_tok_s": fb.get("tokens_per_s"),
            "engine_1stream_ttft_s": (f1.get("ttft_s") or {}).get("min"),
            "speedup_1stream": ratio(s.get("baseline_1stream"), f1),
            f"speedup_{streams}streams": ratio(s.get(f"baseline_{streams}streams"), fb),
            "vs_bf16_engine_1stream": ratio(e1, f1), f"vs_bf16_engine_{streams}streams": ratio(eb, fb),
            "difference": s.get("fp8_difference")}
    rep["summary"] = summary
    print("SUMMARY", rep.data["env"].get("card"), rep.data["summary"], flush=True)


if __name__ == "__main__":
    main()
