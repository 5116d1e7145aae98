"""Random-weight model folders in exactly the formats the production loaders read.

    python -m bench.full_models --out /tmp/genq-models [--tiny] [--device cuda] [--json build.json]

Writes, from the builders in bench/models.py (full size from architectures.json, or their tiny
configs with --tiny) and the tokenizers of pipelines/tiny_*.py (small vocabularies whose ids all lie
below the models' vocab sizes):

    OUT/sdxl/           StableDiffusionXLPipeline diffusers folder, fp16 (SDXL_MODEL_PATH)
    OUT/wan-t2v/        WanPipeline diffusers folder: bf16 transformer, bf16 umT5-XXL, fp32 VAE (WAN_MODEL_PATH)
    OUT/qwen-instruct/  Qwen2ForCausalLM + tokenizer with Qwen 2.5's chat template, bf16 (QWEN_INSTRUCT_MODEL_PATH)

No VACE folder is built: the WAN daemon must run with WAN_MODES_SERVED=none (`ENV` below holds the
settings that serve exactly what was built). After each folder, `check_*` compares the saved configs
with what the loaders rely on, without loading weights. A folder whose OUT/<name>.done.json exists is
kept. The JSON (and the returned dict) records bytes written and build / save seconds per model.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path

import torch

from bench import models

FOLDERS = {"sdxl": "sdxl", "wan": "wan-t2v", "chat": "qwen-instruct"}
GB = 1e9
# Free disk the full-size build needs: 6.9 GB SDXL + 14.8 GB WAN + 15.2 GB Qwen, and a little room.
FULL_DISK_BYTES = 38 * 10**9


def env_for(out: Path) -> dict[str, str]:
    """The production settings that serve exactly the folders written to `out`."""
    return {
        "SDXL_MODEL_PATH": str(out / FOLDERS["sdxl"]),
        "WAN_MODEL_PATH": str(out / FOLDERS["wan"]),
        "WAN_MODES_SERVED": "none",  # text-to-video only: reference modes need a VACE checkpoint
        "QWEN_INSTRUCT_MODEL_PATH": str(out / FOLDERS["chat"]),
    }


def folder_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --- SDXL ------------------------------------------------------------------------------------------

def save_sdxl(out: Path, tiny: bool, device: str) -> dict:
    from transformers import CLIPTokenizer

    from pipelines.tiny_sdxl import _byte_level_vocab

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    pipe = models.build_sdxl(device=device, dtype=dtype, tiny=tiny)
    vocab, merges = _byte_level_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")  # SDXL's second pads with "!"
    pipe.register_modules(tokenizer=tok, tokenizer_2=tok2)
    for encoder, t in ((pipe.text_encoder, tok), (pipe.text_encoder_2, tok2)):
        # CLIP pools at the end-of-text token: its id must be the tokenizer's.
        encoder.config.update(dict(pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id,
                                   eos_token_id=t.eos_token_id))
    _sync(device)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.save_pretrained(out, safe_serialization=True)
    saved = time.perf_counter() - t0
    del pipe
    return {"build_s": round(built, 1), "save_s": round(saved, 1)}


def check_sdxl(out: Path) -> dict:
    from transformers import CLIPTokenizer

    from pipelines.sdxl import _variant

    index = _json(out / "model_index.json")
    unet, te1, te2 = (_json(out / d / "config.json") for d in ("unet", "text_encoder", "text_encoder_2"))
    tokenizer = CLIPTokenizer.from_pretrained(out, subfolder="tokenizer")
    problems = []
    if index.get("_class_name") != "StableDiffusionXLPipeline":
        problems.append(f"model_index _class_name {index.get('_class_name')}")
    if unet["cross_attention_dim"] != te1["hidden_size"] + te2["hidden_size"]:
        problems.append("unet cross_attention_dim != text encoder widths")
    if unet["projection_class_embeddings_input_dim"] != te2["projection_dim"] + 6 * unet["addition_time_embed_dim"]:
        problems.append("unet add-embedding width != pooled width + 6 time ids")
    if len(tokenizer) > min(te1["vocab_size"], te2["vocab_size"]):
        problems.append("tokenizer ids exceed the text encoders' vocab")
    if te1.get("eos_token_id") != tokenizer.eos_token_id:
        problems.append("text encoder eos id is not the tokenizer's")
    if _variant(out) is not None:
        problems.append("weights carry a variant suffix the loader would pick")
    return {"problems": problems, "tokenizer_vocab": len(tokenizer), "unet_sample_size": unet["sample_size"]}


# --- WAN -------------------------------------------------------------------------------------------

def save_wan(out: Path, tiny: bool, device: str) -> dict:
    from diffusers import UniPCMultistepScheduler

    from pipelines.tiny_wan import _model_index, _tokenizer

    t0 = time.perf_counter()
    # WAN's own rope table (1024) in the tiny transformer too, so 832x480 videos fit it.
    pipe = models.build_wan(device=device, tiny=tiny, **({"rope_max_seq_len": 1024} if tiny else {}))
    encoder = models.build_umt5(device=device, tiny=tiny)
    tokenizer = _tokenizer()
    # umT5's special ids, as the tiny tokenizer has them (pad 0, eos 1)
    encoder.config.update(dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    _sync(device)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out / "tokenizer")
    encoder.save_pretrained(out / "text_encoder")
    pipe.transformer.save_pretrained(out / "transformer")
    pipe.vae.save_pretrained(out / "vae")
    UniPCMultistepScheduler(**models._arch("wan2_1_scheduler")).save_pretrained(out / "scheduler")
    _model_index(out, "WanPipeline", "WanTransformer3DModel")
    saved = time.perf_counter() - t0
    del pipe, encoder
    return {"build_s": round(built, 1), "save_s": round(saved, 1)}


def check_wan(out: Path) -> dict:
    from transformers import AutoTokenizer

    transformer = _json(out / "transformer" / "config.json")
    encoder = _json(out / "text_encoder" / "config.json")
    tokenizer = AutoTokenizer.from_pretrained(out, subfolder="tokenizer")
    problems = []
    if transformer.get("_class_name") != "WanTransformer3DModel" or transformer.get("image_dim"):
        problems.append(f"transformer is {transformer.get('_class_name')} (image_dim {transformer.get('image_dim')})")
    if transformer["text_dim"] != encoder["d_model"]:
        problems.append("transformer text_dim != text encoder d_model")
    if len(tokenizer) > encoder["vocab_size"]:
        problems.append("tokenizer ids exceed the text encoder's vocab")
    if transformer.get("rope_max_seq_len", 0) < 52:
        problems.append("rope table shorter than 832x480's 52 patches")
    return {"problems": problems, "tokenizer_vocab": len(tokenizer), "modes_served": "none (no VACE folder)"}


# --- Qwen ------------------------------------------------------------------------------------------

def save_qwen(out: Path, tiny: bool, device: str) -> dict:
    from transformers import GenerationConfig

    from pipelines.tiny_qwen import SPECIAL_TOKENS, _train_tokenizer

    t0 = time.perf_counter()
    model = models.build_qwen(device=device, tiny=tiny)
    tokenizer = _train_tokenizer(vocab_size=320)
    endoftext, _, im_end = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    model.config.update(dict(bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext))
    # Qwen 2.5 instruct's generation config (stops on <|im_end|> / <|endoftext|>). Random weights
    # almost never emit either id (2 of 152064), so replies run to max_tokens: steady timings.
    model.generation_config = GenerationConfig(eos_token_id=[im_end, endoftext], pad_token_id=endoftext,
                                               bos_token_id=endoftext, do_sample=True, temperature=0.7, top_p=0.8)
    _sync(device)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = time.perf_counter() - t0
    del model
    return {"build_s": round(built, 1), "save_s": round(saved, 1)}


def check_qwen(out: Path) -> dict:
    from transformers import AutoTokenizer

    config = _json(out / "config.json")
    tokenizer = AutoTokenizer.from_pretrained(out)
    problems = []
    if len(tokenizer) > config["vocab_size"]:
        problems.append("tokenizer ids exceed the model's vocab")
    if not tokenizer.chat_template:
        problems.append("no chat template: the instruct model would get a transcript prompt")
    if config.get("torch_dtype", config.get("dtype")) not in ("bfloat16", None):
        problems.append(f"saved dtype {config.get('torch_dtype', config.get('dtype'))}")
    # pipelines/chat.py: context limit = max_position_embeddings; warm-up prefills limit - 2 tokens
    return {"problems": problems, "tokenizer_vocab": len(tokenizer),
            "context_limit": config["max_position_embeddings"], "vocab_size": config["vocab_size"]}


# --- driver ----------------------------------------------------------------------------------------

BUILDERS = {"sdxl": (save_sdxl, check_sdxl), "wan": (save_wan, check_wan), "chat": (save_qwen, check_qwen)}


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def build_all(out: Path, tiny: bool, device: str, families=tuple(FOLDERS), report=None) -> dict:
    """Build (or keep) each folder; `report(results)` is called after each one."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"out": str(out), "tiny": tiny, "device": device, "env": env_for(out), "models": {}}
    free = shutil.disk_usage(out).free
    results["disk_free_gib_before"] = round(free / 1024**3, 1)
    if not tiny and free < FULL_DISK_BYTES:
        raise RuntimeError(f"{out}: {free / 1e9:.1f} GB free, the full-size models need about {FULL_DISK_BYTES / 1e9:.0f} GB")
    for family in families:
        folder, done = out / FOLDERS[family], out / f"{FOLDERS[family]}.done.json"
        save, check = BUILDERS[family]
        if done.exists():
            entry = {**_json(done), "kept": True}
        else:
            shutil.rmtree(folder, ignore_errors=True)
            entry = save(folder, tiny, device)
            _free(device)
            t0 = time.perf_counter()
            os.sync()  # the bytes are on disk: what a cold start reads
            entry["sync_s"] = round(time.perf_counter() - t0, 1)
            nbytes, nfiles = folder_bytes(folder)
            entry.update(path=str(folder), bytes=nbytes, files=nfiles,
                         write_gb_s=round(nbytes / GB / max(entry["save_s"] + entry["sync_s"], 1e-3), 2))
            entry["check"] = check(folder)
            done.write_text(json.dumps(entry, indent=1))
        results["models"][family] = entry
        if report:
            report(results)
    results["bytes_total"] = sum(m["bytes"] for m in results["models"].values())
    results["problems"] = {f: m["check"]["problems"] for f, m in results["models"].items() if m["check"]["problems"]}
    if report:
        report(results)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/genq-models")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--families", default=",".join(FOLDERS))
    ap.add_argument("--json", help="write the results here after each model")
    args = ap.parse_args()

    printed: set[str] = set()

    def report(results: dict) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        for family, entry in results["models"].items():
            if family not in printed:
                printed.add(family)
                print(f"[build] {family}: {json.dumps(entry)}", flush=True)

    results = build_all(Path(args.out), args.tiny, args.device, tuple(args.families.split(",")), report)
    print(f"[build] done: {results['bytes_total'] / GB:.1f} GB, problems: {results['problems'] or 'none'}", flush=True)


if __name__ == "__main__":
    main()
