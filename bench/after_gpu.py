"""Where a lone 1-image SDXL job spends its time after the GPU, step by step, on this machine's CPU.

    python -m bench.after_gpu [--size 1024] [--repeats 7] [--png-level N]

The real code against the local stand-ins the tests use: a private redis-server, the Storage stub
(uploads through the supabase client, as in production) and the signature-checking callback
receiver, the stubs in a child process as in bench/stack.py (their Python must not take this
process's GIL). Each step that `consumers.generation.generate` and `reporting.completed` run between
the pipeline's return and the completion callback is timed alone (median of `--repeats`), then the
whole sequence as the daemon runs it. Two images: "grainy" (smooth content plus grain, like a photo) and
"noise" (what random-weight models produce). No GPU needed.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image
from rq import Queue
from rq.serializers import JSONSerializer

from consumers import reporting
from consumers.images import image_assets
from consumers.progress import Progress
from schemas.sdxl import SdxlRequest
from schemas.settings import Settings
from tests.conftest import RedisServer
from tests.stubs.callback_receiver import CallbackReceiver
from tests.stubs.storage import StorageStub
from uploader import StoredAsset, Uploader, encode_png, encode_webp_thumbnail, image_paths

KEY, SECRET = "bench-service-key", "bench-callback-secret"
USER = "11111111-1111-4111-8111-111111111111"


def images(size: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC)
    grain = np.asarray(smooth).astype(np.float32) + rng.normal(0, 2, (size, size, 3))
    return {"grainy": Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8)),
            "noise": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))}


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 1)


def completed_body(runtime, job_id: str, stored) -> None:
    """What consumers/images.py sends for a 1-image, 15-step job: its assets, then the signed callback."""
    request = SdxlRequest(job_id=job_id, user_id=USER, job_type="sdxl_image_fast", prompt="bench", width=stored[0].width,
                          height=stored[0].height, steps=15, guidance_scale=7.5, num_images=1, seeds=[1])
    reporting.completed(runtime, job_id, image_assets(request, stored),
                        {"seed": 1, "num_images": 1, "generation_time": 1.5})


def measure(runtime, img: Image.Image, repeats: int) -> dict[str, float]:
    up, level = runtime.uploader, runtime.settings.png_compress_level
    png, thumb = encode_png(img, level), encode_webp_thumbnail(img)
    png_path, thumb_path = image_paths(USER, str(uuid.uuid4()), 0)
    stored = [StoredAsset(png_path, thumb_path, img.width, img.height, len(png))]
    queue = Queue("bench_queue", connection=runtime.redis, serializer=JSONSerializer)

    def progress() -> Progress:
        job = queue.enqueue("consumers.tasks.perform", {}, job_id=str(uuid.uuid4()))
        return Progress(runtime, job, job.id)

    def after_gpu() -> None:  # consumers.generation.generate from the pipeline's return on
        p = progress()
        p.set_stage("uploading")
        stored = up.store_images(USER, p.job_id, [img])
        p.close()
        completed_body(runtime, p.job_id, stored)

    open_progress = [progress() for _ in range(repeats)]
    return {
        "set_stage (rq meta)": median_ms(lambda: open_progress[0].set_stage("uploading"), repeats),
        "progress.close": median_ms(lambda: open_progress.pop().close(), repeats),
        f"encode_png (level {level})": median_ms(lambda: encode_png(img, level), repeats),
        "upload png": median_ms(lambda: up.upload(png_path, png, "image/png"), repeats),
        "encode thumbnail": median_ms(lambda: encode_webp_thumbnail(img), repeats),
        "upload thumbnail": median_ms(lambda: up.upload(thumb_path, thumb, "image/webp"), repeats),
        "store_images (all four)": median_ms(lambda: up.store_images(USER, str(uuid.uuid4()), [img]), repeats),
        "completion callback": median_ms(lambda: completed_body(runtime, str(uuid.uuid4()), stored), repeats),
        "after GPU, whole": median_ms(after_gpu, repeats),
        "png KiB": round(len(png) / 1024),
    }


def serve_stubs(conn) -> None:
    """In a child process: the Storage stub and the callback receiver until the parent says stop."""
    with StorageStub(service_key=KEY) as storage, CallbackReceiver(secret=SECRET, service_key=KEY) as receiver:
        conn.send((storage.url, receiver.url))
        conn.recv()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--png-level", type=int, default=None, help="GENQ_PNG_COMPRESS_LEVEL (default: the setting's)")
    args = ap.parse_args()
    parent, child = multiprocessing.Pipe()
    stubs = multiprocessing.Process(target=serve_stubs, args=(child,), daemon=True)
    stubs.start()
    storage_url, receiver_url = parent.recv()
    with tempfile.TemporaryDirectory(prefix="genq-bench-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            extra = {} if args.png_level is None else {"png_compress_level": args.png_level}
            settings = Settings(supabase_url=storage_url, supabase_service_role_key=KEY, storage_backend="supabase",
                                job_callback_url=receiver_url, job_callback_secret=SECRET, **extra)
            redis = server.client()
            uploader = Uploader(settings, redis)
            runtime = SimpleNamespace(settings=settings, redis=redis, uploader=uploader, worker_id="bench")
            for name, img in images(args.size).items():
                print(f"{name} {args.size}x{args.size}:")
                for step, value in measure(runtime, img, args.repeats).items():
                    print(f"  {step:28s} {value:8.1f}")
            uploader.close()
        finally:
            server.stop()
            parent.send("stop")
            stubs.join(10)


if __name__ == "__main__":
    main()
