"""What a failed job becomes, as data (dramatiq-style): final or retried, and the reason reported."""
from __future__ import annotations

from dataclasses import dataclass

from rq.exceptions import AbandonedJobError
from rq.timeouts import JobTimeoutException

from schemas.errors import PayloadError, PolicyViolation


class Cancelled(Exception):
    """The caller cancelled the job (genq:cancel:<id>); raised between steps or tokens."""

    reason = "cancelled"


class DeadlinePassed(Exception):
    """A chat job whose caller stopped waiting (deadline_ms) is answered without running."""

    reason = "deadline_passed"


@dataclass(frozen=True)
class Outcome:
    retry: bool
    reason: str
    cancelled: bool = False


# First match wins. Anything unforeseen is retried a bounded number of times (GENQ_MAX_ATTEMPTS).
POLICY: tuple[tuple[type[BaseException] | str, Outcome], ...] = (
    (Cancelled, Outcome(retry=False, reason="cancelled", cancelled=True)),
    (DeadlinePassed, Outcome(retry=False, reason="deadline_passed")),
    (PolicyViolation, Outcome(retry=False, reason="policy_violation")),
    (PayloadError, Outcome(retry=False, reason="invalid_payload")),  # includes uploader.FetchError
    ("OutOfMemoryError", Outcome(retry=False, reason="out_of_memory")),  # torch.cuda.OutOfMemoryError
    (JobTimeoutException, Outcome(retry=False, reason="timeout")),
    (AbandonedJobError, Outcome(retry=True, reason="daemon_died")),
    (Exception, Outcome(retry=True, reason="internal_error")),
)


def classify(exc: BaseException | None) -> Outcome:
    for kind, outcome in POLICY:
        if isinstance(kind, str):
            if any(cls.__name__ == kind for cls in type(exc).__mro__):
                return outcome
        elif isinstance(exc, kind):
            return outcome
    return Outcome(retry=False, reason="internal_error")


def reason_of(exc: BaseException | None) -> str:
    return getattr(exc, "reason", None) or classify(exc).reason


def describe(exc: BaseException | None) -> str:
    """A one-line message for the caller: what went wrong, never a traceback or a secret."""
    if exc is None:
        return "unknown error"
    if isinstance(exc, AbandonedJobError):
        return "the daemon running this job died, and the job used up its attempts"
    if classify(exc).reason == "out_of_memory":
        return "out of GPU memory while running this job"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:500]
