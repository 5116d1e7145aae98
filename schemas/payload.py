"""Today's queue payloads: decoding the three list encodings and the fields every family shares.

The family adapters (`sdxl.adapt_sdxl`, `wan.adapt_wan`, `chat.adapt_chat`) build on `decode` and
`identity`; `adapt` routes on the payload's `type`.
"""
from __future__ import annotations

import json
import random
from typing import Any

from .errors import PayloadError

SEED_RANGE = (1, 2**31 - 1)  # what the web app itself draws from; 0 never arrives


def decode(raw: bytes | str, max_bytes: int) -> dict[str, Any]:
    """One list element -> the job dict. Accepts a JSON object, `["<json string>"]` or `[{...}]`."""
    if len(raw) > max_bytes:
        raise PayloadError("", f"payload is {len(raw)} bytes, more than the {max_bytes} allowed")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError("", f"payload is not JSON: {exc}") from None
    if isinstance(value, list):
        if len(value) != 1:
            raise PayloadError("", f"a list payload must hold exactly one job (got {len(value)} elements)")
        value = value[0]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise PayloadError("", f"the list's string element is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PayloadError("", f"payload must be a JSON object, got {type(value).__name__}")
    return value


def job_id_of(job: dict[str, Any]) -> str | None:
    """The id to report under, if the payload has a usable one (even when the rest is invalid)."""
    for key in ("id", "job_id"):
        value = job.get(key)
        if isinstance(value, str) and 0 < len(value) <= 64:
            return value
    return None


def get_path(job: dict[str, Any], path: str, expected: type | tuple[type, ...], default: Any = None) -> Any:
    """`job["config"]["seed"]` as `get_path(job, "config.seed", int)`: absent or null gives `default`,
    a present value of the wrong type is an error naming the field."""
    node: Any = job
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            raise PayloadError(".".join(parts[:i]), "must be an object")
        node = node.get(part)
        if node is None:
            return default
    # bool is an int in Python; a flag is never a number and a number is never a flag
    if isinstance(node, bool) and bool not in _as_tuple(expected):
        raise PayloadError(path, f"must be {_type_names(expected)}, got a boolean")
    if not isinstance(node, expected):
        raise PayloadError(path, f"must be {_type_names(expected)}, got {type(node).__name__}")
    return node


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _type_names(t: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             dict: "an object", list: "a list"}
    return " or ".join(names.get(x, x.__name__) for x in _as_tuple(t))


def get_number(job: dict[str, Any], path: str, default: float | None = None) -> float | None:
    value = get_path(job, path, (int, float))
    return default if value is None else float(value)


def get_int(job: dict[str, Any], path: str, default: int | None = None) -> int | None:
    value = get_path(job, path, (int, float))
    if value is None:
        return default
    if value != int(value):
        raise PayloadError(path, f"must be a whole number, got {value!r}")
    return int(value)


def seed_of(job: dict[str, Any]) -> tuple[int, bool]:
    """(seed, given): `config.seed`, else `metadata.seed`, else a random one that gets recorded."""
    seed = get_int(job, "config.seed")
    if seed is None:
        seed = get_int(job, "metadata.seed")
    if seed is not None:
        if seed < 0:
            raise PayloadError("config.seed", f"must be 0 or more, got {seed}")
        return seed, True
    return random.randint(*SEED_RANGE), False


def identity(job: dict[str, Any]) -> dict[str, Any]:
    """Fields every image/video job shares, checked and named as the caller names them."""
    job_id = job_id_of(job)
    if job_id is None:
        raise PayloadError("id", "missing (a string of 1-64 characters)")
    other = job.get("job_id")
    if other is not None and job.get("id") is not None and other != job.get("id"):
        raise PayloadError("job_id", "differs from id")
    user_id = get_path(job, "user_id", str)
    if not user_id:
        raise PayloadError("user_id", "missing")
    if get_path(job, "compel_enabled", bool, False):
        # Prompt weighting syntax would be read as plain words: refusing beats a silently different image.
        raise PayloadError("compel_enabled", "prompt weighting (compel) is not supported by genq; send false")
    if get_path(job, "compel_weights", str):
        raise PayloadError("compel_weights", "prompt weighting (compel) is not supported by genq")
    prompt = get_path(job, "prompt", str)
    if prompt is None:
        raise PayloadError("prompt", "missing")
    negative = get_path(job, "negative_prompt", str)
    if negative is None:
        negative = get_path(job, "metadata.negative_prompt", str, "")
    return {"job_id": job_id, "user_id": user_id, "prompt": prompt, "negative_prompt": negative}


def require_type(job: dict[str, Any], allowed: tuple[str, ...]) -> str:
    job_type = get_path(job, "type", str)
    if job_type is None:
        raise PayloadError("type", "missing")
    if job_type not in allowed:
        raise PayloadError("type", f"must be one of {', '.join(allowed)} (got {job_type!r:.40})")
    return job_type


def enhancement_of(job: dict[str, Any]) -> dict[str, Any] | None:
    block = get_path(job, "enhancement", dict)
    return dict(block) if block is not None else None
