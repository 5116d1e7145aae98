"""Write measured figures from bench results (sdxl.json, wan.json, qwen.json) into bench/memory_table.json.

    python -m bench.memory_table RESULTS_DIR [--table bench/memory_table.json]

Keeps the table's schema (memory.py reads it).  A job point's peak is the accelerated (GENQ_ACCEL=1,
serving) path's peak *reserved* bytes (what the caching allocator actually holds on the card), its
resident bytes what was allocated before the job started; the plain diffusers path's figures ride
along as plain_diffusers_* (much larger: its fp32 VAE decode).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 1024**3


def _b(gib: float) -> int:
    return int(round(gib * GIB))


def _points(rows: list[dict], unit) -> list[dict]:
    """One point per shape from the accelerated (serving) path; the plain path's peak rides along."""
    served: dict[str, dict] = {}
    plain: dict[str, dict] = {}
    for r in rows:
        (plain if r["path"] == "baseline" else served)[r["shape"]] = r
    points = []
    for shape, r in sorted({**plain, **served}.items(), key=lambda kv: unit(kv[1])):
        point = {"shape": shape, "units": unit(r), "resident_bytes": _b(r["resident_gib"]),
                 "peak_bytes": _b(r["peak_reserved_gib"]), "peak_allocated_bytes": _b(r["peak_allocated_gib"]),
                 "path": r["path"]}
        if shape in plain and plain[shape] is not r:
            point["plain_diffusers_peak_bytes"] = _b(plain[shape]["peak_reserved_gib"])
            point["plain_diffusers_resident_bytes"] = _b(plain[shape]["resident_gib"])
        points.append(point)
    return points


def update(table: dict, results: Path) -> list[str]:
    done, cards = [], set()
    sdxl = _load(results / "sdxl.json")
    if sdxl:
        cards.add(sdxl["env"].get("card"))
        rows = [dict(r, shape=f"{r['width']}x{r['height']} x{r['images']}")
                for k in ("memory_baseline", "memory_accel_eager") for r in sdxl["stages"].get(k, [])]
        if rows:
            table["jobs"]["sdxl"]["points"] = _points(rows, lambda r: r["width"] * r["height"] * r["images"])
            done.append("jobs.sdxl")
        params = sdxl["stages"].get("build", {}).get("params_b", {})
        if params:
            table["parts"]["sdxl.unet"] = {"bytes": int(params["unet"] * 1e9 * 2), "dtype": "float16",
                                           "source": "measured build"}
            table["parts"]["sdxl.text_encoders"] = {
                "bytes": int((params["text_encoder"] + params["text_encoder_2"]) * 1e9 * 2), "dtype": "float16",
                "source": "measured build"}
            table["parts"]["sdxl.vae"] = {"bytes": int(params["vae"] * 1e9 * 2), "dtype": "float16/bfloat16",
                                          "source": "measured build (decode upcast to float32 counted in the job)"}
            done.append("parts.sdxl")
    wan = _load(results / "wan.json")
    if wan:
        cards.add(wan["env"].get("card"))
        s = wan["stages"]
        rows = [dict(r, shape=f"{r['width']}x{r['height']} x{r['frames']} frames") for k in
                ("memory_baseline_1frame", "memory_accel_1frame") if (r := s.get(k))]
        build = s.get("build", {})
        for path, step, dec in (("baseline", "baseline_per_step", "baseline_vae_decode_fp32"),
                                ("accel", "accel_per_step", "accel_vae_decode_bf16")):
            if s.get(step) and s.get(dec):
                peak = max(s[step], s[dec], key=lambda m: m["peak_reserved_gib"])
                rows.append({"shape": "832x480 x81 frames, text encoder not on the card", "path": path,
                             "width": 832, "height": 480, "frames": 81, "resident_gib": build["allocated_gib"],
                             "peak_reserved_gib": peak["peak_reserved_gib"],
                             "peak_allocated_gib": peak["peak_allocated_gib"]})
        if rows:
            table["jobs"]["wan"]["points"] = _points(rows, lambda r: r["width"] * r["height"] * r["frames"])
            done.append("jobs.wan")
        for part, key in (("wan.transformer", "transformer"), ("wan.vae", "vae")):
            if key in build.get("weights_gib", {}):
                table["parts"][part] = {"bytes": _b(build["weights_gib"][key]), "dtype": "measured",
                                        "source": "measured build"}
        if (te := s.get("memory_text_encoder")):
            table["parts"]["wan.text_encoder"] = {"bytes": _b(te["weights_gib"]), "dtype": "bfloat16",
                                                  "source": "measured build"}
    qwen = _load(results / "qwen.json")
    if qwen:
        cards.add(qwen["env"].get("card"))
        rows = [dict(r, shape=f"{r['context_tokens']} prompt tokens, batch 1")
                for r in qwen["stages"].get("memory_grid", []) if r["batch"] == 1]
        if rows:
            table["jobs"]["chat"]["points"] = _points(rows, lambda r: r["context_tokens"] + 64)
            done.append("jobs.chat")
        if (b := qwen["stages"].get("build")):
            for part in ("qwen_instruct", "qwen_base"):
                table["parts"][part] = {**table["parts"].get(part, {}), "bytes": int(b["params_b"] * 1e9 * 2),
                                        "dtype": "bfloat16", "source": "measured build"}  # keeps fp8_bytes
    if done:
        table["status"] = "measured"
        table["gpu"] = ", ".join(sorted(c for c in cards if c))
        table["command"] = "bash bench/run_device.sh sdxl qwen wan; python -m bench.memory_table $OUT"
    return done


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results", type=Path)
    ap.add_argument("--table", type=Path, default=Path(__file__).with_name("memory_table.json"))
    args = ap.parse_args()
    table = json.loads(args.table.read_text())
    done = update(table, args.results)
    args.table.write_text(json.dumps(table, indent=2) + "\n")
    print("updated:", ", ".join(done) or "nothing")


if __name__ == "__main__":
    main()
