"""Qwen 2.5 7B: generate() with the default cache against pipelines.accel.FastDecoder, same run, same card.

    python -m bench.qwen [--tiny] [--runs 3] [--prompt-tokens 300] [--new-tokens 256] [--batch 16]
"""
from __future__ import annotations

import time

import torch

from bench.harness import Report, compare, import_accel, memory, parse_args, ratio, reset_memory, sync, timed
from bench.models import build_qwen


def main() -> None:
    args = parse_args(__doc__, lambda ap: (ap.add_argument("--prompt-tokens", type=int, default=300),
                                           ap.add_argument("--new-tokens", type=int, default=256),
                                           ap.add_argument("--batch", type=int, default=16),
                                           ap.add_argument("--hf-static", action="store_true",
                                                           help="also time generate(cache_implementation='static')")))
    accel = import_accel()
    dev = args.device
    if args.tiny:
        args.prompt_tokens, args.new_tokens, args.batch = 12, 8, 3
    rep = Report("qwen", args)
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
    gen = torch.Generator(dev).manual_seed(0)

    def prompt(batch: int):
        ids = torch.randint(100, vocab, (batch, args.prompt_tokens), device=dev, generator=gen)
        return ids, torch.ones_like(ids)

    ids1, mask1 = prompt(1)
    idsb, maskb = prompt(args.batch)
    n_new = args.new_tokens

    def hf(ids, mask, new=n_new, **kw):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, **kw)

    def tok_s(res: dict, batch: int) -> dict:
        res["tokens_per_s"] = round(batch * n_new / res["min_s"], 1)
        res["tokens_per_s_median"] = round(batch * n_new / res["median_s"], 1)
        return res

    def reference():
        out = hf(ids1, mask1)
        st["ref_tokens"] = out[0, args.prompt_tokens:].tolist()
        with torch.no_grad():
            st["ref_logits"] = model(input_ids=ids1, attention_mask=mask1).logits[:, -1].float()
        return {"tokens": len(st["ref_tokens"])}

    rep.stage("baseline_1stream", lambda: tok_s(timed(lambda: hf(ids1, mask1), dev, args.runs), 1))
    rep.stage("baseline_ttft", lambda: timed(lambda: hf(ids1, mask1, new=1), dev, 5))
    rep.stage(f"baseline_{args.batch}streams", lambda: tok_s(timed(lambda: hf(idsb, maskb), dev, 2), args.batch))
    rep.stage("baseline_reference", reference)
    if args.hf_static:
        rep.stage("hf_static_1stream", lambda: tok_s(timed(lambda: hf(ids1, mask1, cache_implementation="static"),
                                                           dev, args.runs), 1), optional_cost_s=120)

    max_len = args.prompt_tokens + n_new + 16
    dec = accel.FastDecoder(model, max_len=max_len, compile=dev == "cuda")
    ttft: list[float] = []

    def ours(ids, mask, record_ttft=False):
        t0 = time.perf_counter()

        def first():
            sync(dev)
            if record_ttft:
                ttft.append(time.perf_counter() - t0)
        return dec.generate(ids, mask, n_new, on_first_token=first)

    rep.stage("accel_1stream", lambda: tok_s(timed(lambda: ours(ids1, mask1), dev, args.runs), 1))

    def ttft_stage():
        ttft.clear()
        for _ in range(5):
            ours(ids1, mask1, record_ttft=True)
        return {"ttft_s": [round(t, 4) for t in ttft], "min_s": round(min(ttft), 4),
                "median_s": round(sorted(ttft)[len(ttft) // 2], 4)}

    rep.stage("accel_ttft", ttft_stage)

    def check():
        got = ours(ids1, mask1)[0]
        same = next((i for i, (a, b) in enumerate(zip(got, st["ref_tokens"])) if a != b), len(got))
        with torch.inference_mode():
            cache_logits = dec._forward_last(ids1, torch.arange(args.prompt_tokens, device=dev)[None],
                                             torch.arange(args.prompt_tokens, device=dev),
                                             mask1, dec._cache(1)).float()
        # Random weights leave near-ties between the top logits, so two correct decoders part ways
        # after a few tokens; what must hold is that each cached step picks the token a full
        # uncached forward over the same sequence picks.
        seq = torch.cat([ids1, torch.tensor([got], device=dev)], dim=1)
        with torch.no_grad():
            full = model(input_ids=seq).logits[0, args.prompt_tokens - 1:-1].float()
        top2 = full.topk(2, dim=-1).values
        agree = full.argmax(-1).tolist()
        disagree = [i for i, (a, b) in enumerate(zip(agree, got)) if a != b]
        return {"greedy_tokens_equal_prefix": same, "of": len(got),
                "cached_step_equals_full_forward_argmax": len(got) - len(disagree),
                "disagreements_top2_margin": [round(float(top2[i, 0] - top2[i, 1]), 4) for i in disagree][:20],
                "prefill_logits": compare(st["ref_logits"], cache_logits),
                "tolerance": {"prefill_logits.rel_l2": 1e-2}}

    rep.stage("equality", check)
    rep.stage(f"accel_{args.batch}streams", lambda: tok_s(timed(lambda: ours(idsb, maskb), dev, args.runs), args.batch))

    def memory_grid():
        rows = []
        for batch in (1, 4, 16):
            for ctx in ((16, 32) if args.tiny else (512, 2048, 8192)):
                d = accel.FastDecoder(model, max_len=ctx + 64, compile=False)
                ids = torch.randint(100, vocab, (batch, ctx), device=dev, generator=gen)
                reset_memory(dev)
                resident = memory(dev).get("allocated_gib")
                d.generate(ids, torch.ones_like(ids), 4)
                sync(dev)
                rows.append({"family": "qwen", "path": "fastdecoder_eager", "batch": batch, "context_tokens": ctx,
                             "resident_gib": resident, **memory(dev)})
                del d
        return rows

    rep.stage("memory_grid", memory_grid, optional_cost_s=60)
    s = rep.data["stages"]
    b1, bb = s.get("accel_1stream") or {}, s.get(f"accel_{args.batch}streams") or {}
    rep["summary"] = {
        "speedup_1stream": ratio(s.get("baseline_1stream"), s.get("accel_1stream")),
        f"speedup_{args.batch}streams": ratio(s.get(f"baseline_{args.batch}streams"), s.get(f"accel_{args.batch}streams")),
        "accel_1stream_tok_s": b1.get("tokens_per_s"), f"accel_{args.batch}streams_tok_s": bb.get("tokens_per_s"),
        "hf_static_1stream_tok_s": (s.get("hf_static_1stream") or {}).get("tokens_per_s"),
        "accel_ttft_s": (s.get("accel_ttft") or {}).get("min_s"),
    }
    print("SUMMARY", rep.data["env"].get("card"), rep.data["summary"], flush=True)


if __name__ == "__main__":
    main()
