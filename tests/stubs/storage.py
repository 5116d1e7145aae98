"""`StorageStub`: a local Supabase Storage with the behaviour the daemons depend on (contract section 3).

    with StorageStub(service_key="k") as storage:
        settings = Settings(SUPABASE_URL=storage.url, SUPABASE_SERVICE_ROLE_KEY="k")
        ...
        data, content_type = storage.objects[("workspace-temp", "u/j/0.png")]

Uploads: POST (create; upsert with `x-upsert: true`) and PUT (update) on
`/storage/v1/object/<bucket>/<path>`, the file as the raw body or as the `file` part of a multipart
form (what storage3 sends: fields `cacheControl` and `file`, the part carrying the content type).
Downloads: `GET /storage/v1/object/[authenticated/]<bucket>/<path>` with the key, and signed
`GET /storage/v1/object/sign/<bucket>/<path>?token=...` for URLs made by `sign()`.
Errors look like Storage's: JSON `{"statusCode": "...", "error": "...", "message": "..."}`; a missing
object is HTTP 400 with statusCode "404", a duplicate HTTP 400 with statusCode "409".
"""
from __future__ import annotations

import secrets
import ssl
import uuid
from collections import Counter
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import quote, unquote

from . import LocalServer, Reply, Request, json_reply

ALLOWED_MIME = frozenset({"image/png", "image/webp", "image/jpeg", "video/mp4"})
PREFIX = "/storage/v1/object/"


def _error(http_status: int, status_code: str, error: str, message: str) -> Reply:
    return json_reply(http_status, {"statusCode": status_code, "error": error, "message": message})


def _file_of(request: Request) -> tuple[bytes, str]:
    """(bytes, content type) of an upload, raw or multipart."""
    content_type = request.headers.get("Content-Type", "")
    if not content_type.startswith("multipart/form-data"):
        return request.body, content_type.split(";")[0].strip()
    # The parts are located by their boundary and only their small header blocks go through the email
    # parser: parsing a whole multi-megabyte body line by line took ~60 ms per 3 MB image, which the
    # GPU benchmark of the daemon's overhead (bench/stack.py) would otherwise count as the daemon's.
    boundary = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n"
                                                   ).get_boundary()
    if not boundary:
        raise ValueError("multipart upload without a boundary")
    delimiter = b"\r\n--" + boundary.encode()
    body = b"\r\n" + request.body  # the first delimiter then looks like every other one
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, sep, payload = part.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart part without a header block")
        headers = BytesParser(policy=HTTP).parsebytes(head.removeprefix(b"\r\n") + b"\r\n\r\n")
        if headers.get_param("name", header="content-disposition") == "file":
            return payload, headers.get_content_type()
    raise ValueError("multipart upload without a `file` part")


class StorageStub(LocalServer):
    def __init__(self, service_key: str = "service-key", buckets=("workspace-temp", "user-library"),
                 port: int = 0, tls: ssl.SSLContext | None = None):
        super().__init__(port, tls)
        self.service_key = service_key
        self.buckets = set(buckets)
        self.objects: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.upload_count: Counter[tuple[str, str]] = Counter()
        self.uploads: list[dict] = []  # every accepted upload: bucket, path, content_type, upsert, multipart, headers
        self.redirects: dict[tuple[str, str], str] = {}  # (bucket, path) -> Location answered with 302
        self.send_length = True  # False: downloads come without Content-Length
        self._tokens: dict[str, tuple[str, str]] = {}

    @property
    def url(self) -> str:
        """What SUPABASE_URL would be."""
        return self.base_url

    def put_object(self, bucket: str, path: str, data: bytes, content_type: str = "image/png") -> None:
        with self.lock:
            self.objects[(bucket, path)] = (data, content_type)

    def sign(self, bucket: str, path: str) -> str:
        token = secrets.token_urlsafe(16)
        with self.lock:
            self._tokens[token] = (bucket, path)
        return f"{self.url}{PREFIX}sign/{bucket}/{quote(path)}?token={token}"

    def handle(self, request: Request) -> Reply:
        if not request.path.startswith(PREFIX):
            return _error(404, "404", "not_found", "Route not found")
        rest = unquote(request.path[len(PREFIX):])
        if request.method == "GET" and rest.startswith("sign/"):
            return self._signed(rest[len("sign/"):], request.query.get("token"))
        if request.headers.get("apikey") != self.service_key:
            return json_reply(401, {"message": "Invalid API key"})
        if request.headers.get("Authorization") != f"Bearer {self.service_key}":
            return _error(403, "403", "Unauthorized", "invalid signature")
        if request.method == "GET":
            return self._download(rest.removeprefix("authenticated/"))
        if request.method in ("POST", "PUT"):
            return self._upload(request, rest)
        return _error(405, "405", "method_not_allowed", request.method)

    def _split(self, rest: str) -> tuple[str, str] | Reply:
        bucket, _, path = rest.partition("/")
        if bucket not in self.buckets:
            return _error(404, "404", "Bucket not found", "Bucket not found")
        if not path:
            return _error(400, "400", "InvalidKey", "Invalid key")
        return bucket, path

    def _download(self, rest: str) -> Reply:
        where = self._split(rest)
        if isinstance(where, Reply):
            return where
        with self.lock:
            location = self.redirects.get(where)
            found = self.objects.get(where)
        if location is not None:
            return Reply(302, b"", "text/plain", {"Location": location})
        if found is None:
            return _error(400, "404", "not_found", "Object not found")
        return Reply(200, found[0], found[1], send_length=self.send_length)

    def _signed(self, rest: str, token: str | None) -> Reply:
        with self.lock:
            signed_for = self._tokens.get(token or "")
        if signed_for is None or signed_for != tuple(rest.partition("/")[::2]):
            return _error(400, "400", "InvalidJWT", "jwt malformed")
        return self._download(rest)

    def _upload(self, request: Request, rest: str) -> Reply:
        where = self._split(rest)
        if isinstance(where, Reply):
            return where
        try:
            data, content_type = _file_of(request)
        except ValueError as exc:
            return _error(400, "400", "InvalidRequest", str(exc))
        if content_type not in ALLOWED_MIME:
            return _error(415, "415", "invalid_mime_type", f"mime type {content_type or 'none'} is not supported")
        upsert = request.headers.get("x-upsert", "").lower() == "true"
        with self.lock:
            exists = where in self.objects
            if request.method == "POST" and exists and not upsert:
                return _error(400, "409", "Duplicate", "The resource already exists")
            if request.method == "PUT" and not exists:
                return _error(400, "404", "not_found", "Object not found")
            self.objects[where] = (data, content_type)
            self.upload_count[where] += 1
            self.uploads.append({"bucket": where[0], "path": where[1], "content_type": content_type,
                                 "upsert": upsert, "multipart": request.headers.get_content_type() == "multipart/form-data",
                                 "headers": dict(request.headers.items())})
        return json_reply(200, {"Id": str(uuid.uuid4()), "Key": f"{where[0]}/{where[1]}"})
