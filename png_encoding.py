"""Lossless PNG encoding with the deflate spread over threads.

Encoding the PNG is the longest step between a lone SDXL image leaving the GPU and its callback
(bench/after_gpu.py): FFmpeg's and Pillow's encoders both run one zlib stream on one core (55-85 ms for
1024², most of it deflate). PNG allows one zlib stream built from independently deflated parts, each
ended on a byte boundary by a sync flush, as pigz does; zlib releases the GIL, so the parts compress on
PNG_THREADS cores at once. Rows use PNG's "average" filter, computed with numpy from the unfiltered rows
(every PNG filter reads only those, so each part filters its own rows): on photo-like images it
compresses as well as choosing a filter per row (bench/after_gpu.py: 1.65 MiB both at 1024², level 1).
No library offers parallel PNG deflate (FFmpeg's PNG encoder has no slice threads; libpng, libspng and
Pillow deflate in one stream), hence the ~60 lines here; the output is a standard PNG that every
decoder reads (tests decode it with Pillow and FFmpeg).
"""
from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

PNG_THREADS = max(1, min(8, os.cpu_count() or 1))
_MIN_ROWS_PER_PART = 64  # each part restarts deflate's dictionary: keep parts large enough not to matter
_COLOUR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}  # PNG colour types, 8 bits per sample
_pool = ThreadPoolExecutor(max_workers=PNG_THREADS, thread_name_prefix="png")


def _avg_filtered(raw: np.ndarray, above: np.ndarray | None, bpp: int) -> bytes:
    """Rows (h, w*bpp uint8) with PNG filter 3: each byte minus the floor mean of its left and upper
    neighbours (unfiltered; zero outside the image), each row prefixed by its filter byte."""
    rows = raw.astype(np.int16)
    left = np.zeros_like(rows)
    left[:, bpp:] = rows[:, :-bpp]
    up = np.zeros_like(rows)
    up[1:] = rows[:-1]
    if above is not None:
        up[0] = above
    out = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    out[:, 0] = 3
    out[:, 1:] = (rows - ((left + up) >> 1)) & 0xFF
    return out.tobytes()


def _part(raw: np.ndarray, start: int, stop: int, bpp: int, level: int, last: bool) -> tuple[bytes, bytes]:
    """(filtered rows, raw deflate of them ending on a byte boundary) for rows start..stop."""
    data = _avg_filtered(raw[start:stop], raw[start - 1] if start else None, bpp)
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
    return data, deflate.compress(data) + deflate.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_png(img: Image.Image, compress_level: int = 1, threads: int | None = None) -> bytes:
    """Lossless at every zlib level; the level only trades encoding time for file size
    (GENQ_PNG_COMPRESS_LEVEL, docs/DAEMON.md). L, RGB and RGBA are stored as they are; LA as RGBA, which
    holds its values exactly; any other mode as RGB."""
    if img.mode not in _COLOUR_TYPES:
        img = img.convert("RGBA" if img.mode == "LA" else "RGB")
    pixels = np.asarray(img)
    bpp = 1 if pixels.ndim == 2 else pixels.shape[2]
    height, width = pixels.shape[:2]
    raw = pixels.reshape(height, width * bpp)
    parts = max(1, min(threads or PNG_THREADS, height // _MIN_ROWS_PER_PART))
    bounds = [height * i // parts for i in range(parts + 1)]
    tasks = [_pool.submit(_part, raw, start, stop, bpp, compress_level, i == parts - 1)
             for i, (start, stop) in enumerate(zip(bounds, bounds[1:]))]
    adler, streams = 1, []
    for task in tasks:
        data, stream = task.result()
        adler = zlib.adler32(data, adler)
        streams.append(stream)
    # zlib header: deflate with a 32 KiB window, FCHECK making it a multiple of 31; no preset dictionary.
    header = bytes((0x78, 0x01))
    idat = header + b"".join(streams) + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[img.mode], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
