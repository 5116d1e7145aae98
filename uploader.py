"""All traffic with storage and the caller (DESIGN.md; contract sections 2-5).

Reference inputs are fetched under host rules and size/pixel caps; outputs are encoded (PNG, WebP
thumbnails, H.264 MP4) and stored in Supabase Storage or a local folder; callbacks are HMAC-signed and
go through a durable Redis outbox; chat answers are pushed to their reply keys. No inference here.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import socket
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote, urlsplit, urlunsplit

import av
import httpx
import numpy as np
import redis
import supabase
from PIL import Image, ImageOps
from storage3.exceptions import StorageApiError
from supabase.lib.client_options import SyncClientOptions
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from png_encoding import encode_png
from schemas.common import Reference, check_safe_id
from schemas.errors import PayloadError
from schemas.settings import Settings

log = logging.getLogger(__name__)

REFERENCE_BUCKETS = frozenset({"user-library", "workspace-temp"})
# Only these decoders are reachable from a hostile reference.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# A batch of 1024px PNGs or an 81-frame MP4 over a slow link; the stock client's 20 s is too short.
STORAGE_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
STORE_THREADS = 4  # PNGs and thumbnails of one job encoded and uploaded at once
OUTBOX = "genq:outbox"  # hash: entry id -> {"body": exact signed JSON, "created_at", "attempts", ...}
OUTBOX_DUE = "genq:outbox:due"  # sorted set: entry id -> epoch seconds of its next try (or lease end)
OUTBOX_BASE_DELAY_S = 5.0
OUTBOX_MAX_DELAY_S = 600.0

# Claim an outbox entry that is due by pushing its due time to the end of a lease, atomically:
# of two daemons running deliver_outbox() at once, only one gets 1. A claimant that dies mid-send
# leaves the entry to be claimed again when the lease runs out, so nothing is orphaned.
_CLAIM = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if due and (ARGV[2] == '+inf' or tonumber(due) <= tonumber(ARGV[2])) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 1
end
return 0
"""


class FetchError(PayloadError):
    """A reference input is refused, unreachable or not an image. Final for the job."""

    reason = "reference_unavailable"


class StorageError(Exception):
    """Storage refused an object, or stayed unavailable through the retries."""

    reason = "storage_error"

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    """An answer worth trying again: 429 or 5xx."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


@dataclass(frozen=True)
class StoredFile:
    path: str  # inside the bucket, without the bucket
    content_type: str
    size: int


@dataclass(frozen=True)
class StoredAsset:
    url: str  # path of the full-size file inside the bucket
    thumbnail_url: str
    width: int
    height: int
    file_size_bytes: int


# --- encoding (PNG: png_encoding.py) -------------------------------------------------------

def encode_webp_thumbnail(img: Image.Image, longest_edge: int = 256) -> bytes:
    # Always exactly `longest_edge` on the long side (small outputs are scaled up) so the UI's
    # thumbnails are uniform.
    scale = longest_edge / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    rgb = img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image too
    buf = io.BytesIO()
    # method 0: libwebp's fastest search. At 256 px it changes the size by at most ~2 KB and PSNR at
    # the same quality by under 1 dB, invisible in a thumbnail; method 4 took 3-4x as long.
    rgb.resize(size, Image.Resampling.LANCZOS).save(buf, format="WEBP", quality=80, method=0)
    return buf.getvalue()


def _video_array(frames: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
    """Frames as uint8 (T, H, W, 3), cropped to even sides (yuv420p halves the chroma planes)."""
    if isinstance(frames, np.ndarray):
        array = frames
    else:
        array = np.stack([np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f) for f in frames])
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or len(array) == 0:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) with T >= 1, got {array.dtype} {array.shape}")
    height, width = array.shape[1] & ~1, array.shape[2] & ~1
    if height == 0 or width == 0:
        raise ValueError(f"frames of {array.shape[2]}x{array.shape[1]} are too small for a video")
    return array[:, :height, :width]


def encode_mp4(frames: Sequence[Image.Image] | np.ndarray, fps: int = 16) -> bytes:
    """H.264 (libx264) in MP4, yuv420p, exactly `fps`, moov atom first: plays in every browser."""
    array = _video_array(frames)
    with tempfile.TemporaryDirectory(prefix="genq-mp4-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        # +faststart makes FFmpeg re-read its own output to move the moov atom to the front, which
        # needs a real file: a BytesIO fails at close.
        with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = array.shape[2], array.shape[1], "yuv420p"
            stream.options = {"crf": "18", "preset": "medium"}
            for frame in array:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            out.mux(stream.encode())
        return Path(path).read_bytes()


# --- paths -----------------------------------------------------------------------------------

def _job_prefix(user_id: str, job_id: str) -> str:
    # Ids are checked again here because they become path segments whatever the caller validated.
    return f"{check_safe_id(user_id, 'user_id')}/{check_safe_id(job_id, 'job_id')}"


def image_paths(user_id: str, job_id: str, index: int) -> tuple[str, str]:
    base = f"{_job_prefix(user_id, job_id)}/{int(index)}"
    return f"{base}.png", f"{base}.thumb.webp"


def _segments(path: str) -> list[str]:
    """The segments of an object path; ValueError for anything that could climb out or confuse."""
    if "\\" in path or "\x00" in path:
        raise ValueError("backslashes and NUL are not allowed in a storage path")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError("empty, '.' and '..' segments are not allowed in a storage path")
    return parts


def _forbidden_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback


def _port(parts) -> int | None:
    return parts.port or {"https": 443, "http": 80}.get(parts.scheme)


def _status_of(exc: StorageApiError) -> int | None:
    # storage3 reports the JSON body's statusCode ("409" for a duplicate sent as HTTP 400); the HTTP
    # status decides whether retrying can help, so prefer it where the cause carries it.
    cause = exc.__cause__
    if isinstance(cause, httpx.HTTPStatusError):
        return cause.response.status_code
    try:
        return int(exc.status)
    except (TypeError, ValueError):
        return None


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _wire(body: dict) -> bytes:
    """The callback body serialised once: these exact bytes are signed, stored and sent."""
    return json.dumps(body, separators=(",", ":")).encode()


class Uploader:
    def __init__(self, settings: Settings, redis: redis.Redis, *, attempts: int = 4,
                 backoff: wait_base | None = None):
        """`attempts` and `backoff` shape every in-line retry burst (fetch, upload, callback)."""
        self.settings = settings
        self.redis = redis
        self._retry_args = dict(stop=stop_after_attempt(attempts), reraise=True,
                                wait=backoff if backoff is not None else wait_exponential_jitter(initial=0.5, max=8))
        # Longer than a whole in-line burst, so deliver_outbox() never races send_callback().
        self._lease_s = attempts * (settings.callback_timeout_s + 8) + 30
        # Fetches and callbacks pass their own timeouts. This client is never handed to a library, so
        # nothing can add the service key to its default headers and leak it to a fetched host.
        self._http = httpx.Client(follow_redirects=False)
        self._storage_http: httpx.Client | None = None
        self._claim = redis.register_script(_CLAIM)
        self._bucket = None
        self._supabase = urlsplit(settings.supabase_url) if settings.supabase_url else None
        if settings.storage_backend == "supabase":
            key = settings.supabase_service_role_key.get_secret_value()
            self._storage_http = httpx.Client(timeout=STORAGE_TIMEOUT, follow_redirects=False)
            client = supabase.create_client(settings.supabase_url, key,
                                            options=SyncClientOptions(httpx_client=self._storage_http))
            self._bucket = client.storage.from_(settings.storage_bucket)
        if settings.job_callback_url and settings.job_callback_secret is None:
            log.warning("JOB_CALLBACK_SECRET is not set: callbacks go unsigned and the receiver will refuse them")

    def close(self) -> None:
        self._http.close()
        if self._storage_http is not None:
            self._storage_http.close()

    def _retrying(self) -> Retrying:
        return Retrying(retry=retry_if_exception_type((httpx.TransportError, _Retryable)), **self._retry_args)

    # --- inputs ------------------------------------------------------------------------------

    def fetch_reference(self, ref: Reference, field: str) -> Image.Image:
        """The reference as a decoded RGB image; FetchError naming `field` for anything refused."""
        return self._decode(self._reference_bytes(ref.source, field), field)

    def _reference_bytes(self, source: str, field: str) -> bytes:
        s = self.settings
        if not source.startswith(("http://", "https://")):
            try:
                bucket, *rest = _segments(source)
            except ValueError as exc:
                raise FetchError(field, str(exc)) from None
            if not rest or bucket not in REFERENCE_BUCKETS | {s.storage_bucket}:
                raise FetchError(field, "must be an https URL or a path in the user-library or workspace-temp bucket")
            if self._supabase is None:
                return self._read_local(bucket, "/".join(rest), field)
            key = s.supabase_service_role_key.get_secret_value() if s.supabase_service_role_key else ""
            url = f"{s.supabase_url}/storage/v1/object/{bucket}/{'/'.join(quote(p, safe='') for p in rest)}"
            return self._download(url, {"Authorization": f"Bearer {key}", "apikey": key}, {}, field)
        try:
            parts = urlsplit(source)
            parts.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError as exc:
            raise FetchError(field, f"not a valid URL: {exc}") from None
        if parts.username or parts.password:
            raise FetchError(field, "URLs with credentials are not fetched")
        if self._is_supabase(parts):
            # The operator configured this host, so its address is trusted; signed URLs carry their token.
            return self._download(source, {}, {}, field)
        host = (parts.hostname or "").lower()
        if parts.scheme != "https" or host not in {h.lower() for h in s.fetch_allowed_hosts}:
            raise FetchError(field, f"references are only fetched from the Supabase project or allowed hosts, "
                                    f"not {parts.scheme}://{host}")
        return self._download(*self._pinned(parts, field), field)

    def _is_supabase(self, parts) -> bool:
        ours = self._supabase
        return (ours is not None and (parts.scheme, parts.hostname, _port(parts)) == (ours.scheme, ours.hostname, _port(ours)))

    def _pinned(self, parts, field: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        """The URL rewritten to the address that was checked, so a second DNS answer cannot differ."""
        host, port = parts.hostname, _port(parts)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise FetchError(field, f"cannot resolve {host}: {exc}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not self.settings.fetch_allow_private and any(_forbidden_address(ip) for ip in addresses):
            raise FetchError(field, f"{host} resolves to a private or reserved address")
        ip = min(addresses, key=lambda a: a.version)  # IPv4 first: more often routable from a container
        literal = f"[{ip}]" if ip.version == 6 else str(ip)
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        # Host header and TLS server name (SNI, certificate check) stay the original host's.
        return url, {"Host": parts.netloc}, {"sni_hostname": host}

    def _download(self, url: str, headers: dict[str, str], extensions: dict[str, Any], field: str) -> bytes:
        limit = self.settings.fetch_max_bytes

        def once() -> bytes:
            with self._http.stream("GET", url, headers=headers, extensions=extensions,
                                   timeout=self.settings.fetch_timeout_s) as r:
                if _retryable_status(r.status_code):
                    raise _Retryable(r.status_code)
                if r.status_code != 200:
                    hint = " (redirects are not followed)" if 300 <= r.status_code < 400 else ""
                    raise FetchError(field, f"the source answered HTTP {r.status_code}{hint}")
                declared = r.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise FetchError(field, f"larger than {limit} bytes")
                data = bytearray()
                for chunk in r.iter_bytes():  # counted after content decoding: gzip bombs count too
                    data += chunk
                    if len(data) > limit:
                        raise FetchError(field, f"larger than {limit} bytes")
                return bytes(data)

        try:
            return self._retrying()(once)
        except (httpx.TransportError, _Retryable) as exc:
            raise FetchError(field, f"could not fetch the reference: {type(exc).__name__} {exc}") from exc

    def _read_local(self, bucket: str, path: str, field: str) -> bytes:
        try:
            target = self._local_target(bucket, path)
            if target.stat().st_size > self.settings.fetch_max_bytes:
                raise FetchError(field, f"larger than {self.settings.fetch_max_bytes} bytes")
            return target.read_bytes()
        except (OSError, StorageError) as exc:
            raise FetchError(field, f"cannot read {bucket}/{path} from the local store: {exc}") from None

    def _decode(self, data: bytes, field: str) -> Image.Image:
        # The pixel cap is checked from the header, before any pixel is decoded. Pillow's global
        # MAX_IMAGE_PIXELS stays as a second line; it is not lowered here because it is process-wide.
        try:
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = img.size
            if width * height > self.settings.fetch_max_pixels:
                raise FetchError(field, f"{width}x{height} is more than {self.settings.fetch_max_pixels} pixels")
            return ImageOps.exif_transpose(img).convert("RGB")
        except FetchError:
            raise
        except Image.DecompressionBombError:
            raise FetchError(field, "too many pixels") from None
        except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise FetchError(field, "not a decodable image (PNG, JPEG, WebP, GIF or BMP)") from None

    # --- outputs -----------------------------------------------------------------------------

    def upload(self, path: str, data: bytes, content_type: str) -> StoredFile:
        """Store `data` at `path` in the configured bucket, overwriting (a retry never makes a copy)."""
        if self._bucket is None:
            target = self._local_target(self.settings.storage_bucket, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)  # readers see the old file or the new one, never a torn one
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return StoredFile(path, content_type, len(data))
        options = {"content-type": content_type, "upsert": "true", "cache-control": "3600"}

        def once() -> None:
            try:
                self._bucket.upload(path, data, file_options=options)
            except StorageApiError as exc:
                status = _status_of(exc)
                if status is not None and _retryable_status(status):
                    raise _Retryable(status) from exc
                raise StorageError(f"storage refused {path}: HTTP {status} {exc.code}: {exc.message}", status) from None

        try:
            self._retrying()(once)
        except (httpx.TransportError, _Retryable) as exc:
            raise StorageError(f"storage unavailable for {path}: {type(exc).__name__} {exc}",
                               getattr(exc, "status", None)) from exc
        return StoredFile(path, content_type, len(data))

    def _local_target(self, bucket: str, path: str) -> Path:
        root = (self.settings.output_dir / bucket).resolve()
        try:
            target = root.joinpath(*_segments(path)).resolve()
        except ValueError as exc:
            raise StorageError(f"refused storage path {path!r}: {exc}") from None
        if not target.is_relative_to(root) or target == root:
            raise StorageError(f"refused storage path {path!r}: it leaves the bucket folder")
        return target

    def store_images(self, user_id: str, job_id: str, images: list[Image.Image]) -> list[StoredAsset]:
        level = self.settings.png_compress_level

        def store_png(path: str, img: Image.Image) -> StoredFile:
            return self.upload(path, encode_png(img, level), "image/png")

        # zlib (png_encoding), libwebp and the sockets release the GIL. A PNG and its thumbnail are
        # independent, so each is its own task: a lone image's thumbnail is done while its PNG still
        # encodes, and a 6-image job keeps STORE_THREADS busy. Every task has ended (or failed) before
        # this returns.
        paths = [image_paths(user_id, job_id, i) for i in range(len(images))]
        with ThreadPoolExecutor(max_workers=max(1, min(STORE_THREADS, 2 * len(images)))) as pool:
            tasks = [(pool.submit(store_png, png_path, img), pool.submit(self._store_thumbnail, thumb_path, img))
                     for (png_path, thumb_path), img in zip(paths, images)]
            stored = [(png.result(), thumb.result()) for png, thumb in tasks]
        return [StoredAsset(png.path, thumb.path, img.width, img.height, png.size)
                for (png, thumb), img in zip(stored, images)]

    def store_video(self, user_id: str, job_id: str, frames: Sequence[Image.Image] | np.ndarray,
                    fps: int) -> StoredAsset:
        """`<user>/<job>/0.mp4` and `0.thumb.webp` from the middle frame."""
        base = _job_prefix(user_id, job_id)
        array = _video_array(frames)
        # The thumbnail is encoded and uploaded while FFmpeg encodes the MP4 (both release the GIL).
        with ThreadPoolExecutor(max_workers=1) as pool:
            thumb_task = pool.submit(self._store_thumbnail, f"{base}/0.thumb.webp",
                                     Image.fromarray(array[len(array) // 2]))
            video = self.upload(f"{base}/0.mp4", encode_mp4(array, fps), "video/mp4")
            thumb = thumb_task.result()
        return StoredAsset(video.path, thumb.path, array.shape[2], array.shape[1], video.size)

    def _store_thumbnail(self, path: str, img: Image.Image) -> StoredFile:
        return self.upload(path, encode_webp_thumbnail(img), "image/webp")

    # --- caller ------------------------------------------------------------------------------

    def _headers(self, data: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.settings.job_callback_secret is not None:
            secret = self.settings.job_callback_secret.get_secret_value().encode()
            headers["X-Callback-Signature"] = "sha256=" + hmac.new(secret, data, hashlib.sha256).hexdigest()
        if self.settings.supabase_service_role_key is not None:
            headers["Authorization"] = f"Bearer {self.settings.supabase_service_role_key.get_secret_value()}"
        return headers

    def _post(self, data: bytes) -> bool:
        """One POST. True: delivered. False: refused for good. Raises when a retry may help."""
        r = self._http.post(self.settings.job_callback_url, content=data, headers=self._headers(data),
                            timeout=self.settings.callback_timeout_s)
        if 200 <= r.status_code < 300:
            return True
        if _retryable_status(r.status_code):
            raise _Retryable(r.status_code)
        # 400/401/403...: the receiver judged these exact bytes (or our credentials) and said no.
        # Sending the same bytes again cannot change its answer, so this is not retried: it is
        # logged loudly for an operator (wrong secret or key, or a body the receiver rejects).
        body = json.loads(data)
        log.error("callback for job %s (%s) REFUSED with HTTP %d, dropped: %.300s",
                  body.get("job_id"), body.get("status"), r.status_code, r.text)
        return False

    def _no_receiver(self, data: bytes, level: int) -> bool:
        """Without JOB_CALLBACK_URL (a demo with no receiver) a callback is only logged."""
        if self.settings.job_callback_url:
            return False
        log.log(level, "callback (no JOB_CALLBACK_URL configured): %s", data.decode())
        return True

    def post_callback(self, body: dict) -> bool:
        """Best effort, for `processing` updates a later one supersedes: one try, no outbox."""
        data = _wire(body)
        if self._no_receiver(data, logging.DEBUG):
            return True
        try:
            return self._post(data)
        except (httpx.TransportError, _Retryable) as exc:
            log.warning("progress callback for job %s not delivered: %s %s", body.get("job_id"), type(exc).__name__, exc)
            return False

    def send_callback(self, body: dict) -> bool:
        """Durable: True if delivered now; False if left in the outbox (or refused for good, logged)."""
        data = _wire(body)
        if self._no_receiver(data, logging.INFO):
            return True
        entry = uuid.uuid4().hex
        now = time.time()
        record = {"body": data.decode(), "created_at": now, "attempts": 0,
                  "job_id": body.get("job_id"), "status": body.get("status")}
        # Stored before the first try: if this process dies mid-send, a deliver_outbox() anywhere
        # sends it once the lease below has passed.
        (self.redis.pipeline().hset(OUTBOX, entry, json.dumps(record))
         .zadd(OUTBOX_DUE, {entry: now + self._lease_s}).execute())
        return self._attempt(entry, record, burst=True)

    def _attempt(self, entry: str, record: dict, burst: bool) -> bool:
        data = record["body"].encode()
        try:
            delivered = self._retrying()(self._post, data) if burst else self._post(data)
        except (httpx.TransportError, _Retryable) as exc:
            record["attempts"] += 1
            delay = min(OUTBOX_MAX_DELAY_S, OUTBOX_BASE_DELAY_S * 2 ** (record["attempts"] - 1))
            (self.redis.pipeline().hset(OUTBOX, entry, json.dumps(record))
             .zadd(OUTBOX_DUE, {entry: time.time() + delay}).execute())
            log.warning("callback for job %s (%s) not delivered (%s %s); kept in the outbox, next try in %.0f s",
                        record["job_id"], record["status"], type(exc).__name__, exc, delay)
            return False
        self._forget(entry)
        return delivered

    def _forget(self, entry: str) -> None:
        self.redis.pipeline().hdel(OUTBOX, entry).zrem(OUTBOX_DUE, entry).execute()

    def deliver_outbox(self, now: float | None = None, limit: int = 100, due_by: float | None = None) -> int:
        """Try the callbacks whose time has come (one try each); returns how many were delivered.

        `now` (epoch seconds) lets a caller treat entries as due earlier than their backoff says;
        `due_by` takes entries due up to then without moving the clock their age is judged by
        (math.inf: every entry, whatever its backoff says).
        """
        now = time.time() if now is None else now
        due_by = now if due_by is None else max(now, due_by)
        bound = "+inf" if math.isinf(due_by) else due_by  # Redis's spelling, in ZRANGEBYSCORE and the script
        delivered = 0
        for raw in self.redis.zrangebyscore(OUTBOX_DUE, "-inf", bound, start=0, num=limit):
            entry = _text(raw)
            if not self._claim(keys=[OUTBOX_DUE], args=[entry, bound, now + self._lease_s]):
                continue  # another daemon claimed it first
            raw_record = self.redis.hget(OUTBOX, entry)
            if raw_record is None:
                self.redis.zrem(OUTBOX_DUE, entry)
                continue
            record = json.loads(raw_record)
            if now - record["created_at"] > self.settings.callback_max_age_s:
                log.error("callback for job %s (%s) undelivered for %.0f s after %d attempts: dropped",
                          record["job_id"], record["status"], now - record["created_at"], record["attempts"])
                self._forget(entry)
                continue
            if self._no_receiver(record["body"].encode(), logging.INFO):
                self._forget(entry)
                delivered += 1
                continue
            delivered += self._attempt(entry, record, burst=False)
        return delivered

    def push_reply(self, reply_key: str, body: dict, ttl_s: int) -> None:
        """Answer a chat job: RPUSH the JSON and set the key's TTL, in one transaction."""
        # The key comes from the payload: never let it write into a queue or the daemons' own keys.
        if reply_key.endswith("_queue") or reply_key.startswith(("rq:", OUTBOX)):
            raise ValueError(f"refusing to push a reply to {reply_key!r}")
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(reply_key, json.dumps(body, separators=(",", ":")))
        pipe.expire(reply_key, max(1, int(ttl_s)))
        pipe.execute()
