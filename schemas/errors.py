"""Errors raised while turning a payload into a request. Each names the offending field."""
from __future__ import annotations

from pydantic import ValidationError


class PayloadError(ValueError):
    """The payload cannot become a request. Final: retrying cannot help."""

    reason = "invalid_payload"

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class PolicyViolation(PayloadError):
    """The request breaks the content rule that holds whatever the caller decided."""

    reason = "policy_violation"


def from_validation_error(err: ValidationError, field_names: dict[str, str] | None = None,
                          prefix: str = "") -> PayloadError:
    """The first pydantic error as a PayloadError naming the payload's own field."""
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"])
    names = field_names or {}
    head = loc.split(".")[0]
    if head in names:
        loc = names[head] + loc[len(head):]
    elif prefix and loc:
        loc = f"{prefix}.{loc}"
    got = first.get("input")
    detail = first["msg"]
    if not isinstance(got, (dict, list)) and first["type"] != "missing":
        detail += f" (got {got!r:.80})"
    return PayloadError(loc, detail)
