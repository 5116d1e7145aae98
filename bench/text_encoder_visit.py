"""A WAN job's visit of the umT5-XXL text encoder to the GPU (WAN_TEXT_ENCODER_OFFLOAD, the default): the
`module.to(device)` and back that a plain offload does, against pipelines/host_weights.py's pinned host copy
lent per visit, in one process on one card, with the prompt embeddings of both compared.

    python -m bench.text_encoder_visit [--tiny] [--runs 3] [--out DIR]

Each visit: weights in, one encoder forward of a prompt and a negative prompt (2 x 512 tokens, as the WAN
pipeline encodes them), weights out, the caching allocator emptied (as the daemon hands the memory back),
synchronised. Writes OUT/text_encoder_visit.json after every stage.
"""
from __future__ import annotations

import statistics
import time

import torch

from bench.harness import Report, parse_args, sync
from bench.models import build_umt5
from pipelines.host_weights import HostWeights


def _timed(visit, runs: int, dev: str) -> dict:
    visit()  # warm-up: kernels, allocator
    times = []
    for _ in range(runs):
        sync(dev)
        t0 = time.perf_counter()
        visit()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return {"visit_s": [round(t, 3) for t in times], "min_s": round(min(times), 3),
            "median_s": round(statistics.median(times), 3)}


def main() -> None:
    args = parse_args(__doc__)
    dev = args.device
    rep = Report("text_encoder_visit", args)
    encoder = build_umt5(dev, tiny=args.tiny).to("cpu")  # built on the card (fast), held on the host as loaded
    tokens = 16 if args.tiny else 512
    ids = torch.randint(0, encoder.config.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(0))
    out = {}

    def encode(name: str):
        with torch.no_grad():
            out[name] = encoder(input_ids=ids.to(dev)).last_hidden_state

    def hand_back():  # after the weights have left, as WanVideoPipeline._encode does
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()

    def plain():
        encoder.to(dev)
        try:
            encode("plain")
        finally:
            encoder.to("cpu")
            hand_back()

    gib = sum(p.numel() * p.element_size() for p in encoder.parameters()) / 1024**3
    rep.stage("weights", lambda: {"gib": round(gib, 3)})
    rep.stage("plain_to_and_back", lambda: _timed(plain, args.runs, dev))
    held = {}

    def pin():
        t0 = time.perf_counter()
        held["w"] = HostWeights(encoder)
        return {"setup_s": round(time.perf_counter() - t0, 2), "pinned": held["w"].pinned,
                "block_gib": round(held["w"].nbytes / 1024**3, 3)}

    rep.stage("host_weights_setup", pin)

    def lent():
        try:
            with held["w"].visit(dev):
                encode("lent")
        finally:
            hand_back()

    rep.stage("host_weights_visit", lambda: _timed(lent, args.runs, dev))
    rep.stage("equality", lambda: {"embeddings_equal": bool(torch.equal(out["plain"], out["lent"]))})
    s = rep.data["stages"]
    if "plain_to_and_back" in s and "host_weights_visit" in s:
        rep["summary"] = {"speedup_min": round(s["plain_to_and_back"]["min_s"] / s["host_weights_visit"]["min_s"], 2)}
    print("SUMMARY", rep.data["env"].get("card"), rep.data.get("summary"), flush=True)


if __name__ == "__main__":
    main()
