"""Which gRPC failures are worth retrying, and the tenacity policy that retries them.

Statuses fall in four kinds (docs/protocol.md, "Status codes"):

- transient (the link or a busy cloud): retried with backoff, forever;
- server errors (UNKNOWN, INTERNAL, DATA_LOSS): retried, but only ``max_server_error_attempts`` times for the
  same Upload, since a cloud that fails the same way every time will not stop by itself;
- device-level (UNAUTHENTICATED): raised; the device must register again;
- permanent (everything else: INVALID_ARGUMENT, FAILED_PRECONDITION, PERMISSION_DENIED, ...): the cloud means
  it; resending the same bytes cannot help, so the uplink quarantines the sample.
"""

from __future__ import annotations

import logging

import grpc
from tenacity import AsyncRetrying, RetryCallState, before_sleep_log, stop_after_delay, stop_never
from tenacity.wait import wait_exponential_jitter

from common import clock as clocks

log = logging.getLogger("tandem.device.transport")

TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
SERVER_ERROR_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS})
DEVICE_LEVEL_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED})


class IncompleteTransfer(Exception):
    """A stream ended early (connection cut); the transfer resumes on the next attempt."""


LOCAL_SEND_FAILURE = "Internal error from Core"
"""grpc-aio's detail when a client-stream write fails because the call already ended: the cloud's own answer
(often RESOURCE_EXHAUSTED) was lost in the race, so the status says nothing about the sample."""


def is_local_send_failure(exc: BaseException) -> bool:
    """True for the INTERNAL status grpc-aio makes up on the client when a write races the call's end."""
    return (
        isinstance(exc, grpc.aio.AioRpcError)
        and exc.code() == grpc.StatusCode.INTERNAL
        and exc.details() == LOCAL_SEND_FAILURE
    )


def is_transient(exc: BaseException) -> bool:
    """True for link failures and server errors (retry), False for answers the cloud means (auth, bad input)."""
    if isinstance(exc, IncompleteTransfer) or is_local_send_failure(exc):
        return True
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in TRANSIENT_CODES or exc.code() in SERVER_ERROR_CODES
    return isinstance(exc, (ConnectionError, TimeoutError))


def is_permanent(exc: BaseException) -> bool:
    """True when the cloud refused for good: a status that is neither transient, a server error nor device-level."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        return False
    code = exc.code()
    return code not in TRANSIENT_CODES and code not in SERVER_ERROR_CODES and code not in DEVICE_LEVEL_CODES


class _RetryPolicy:
    """tenacity ``retry=``: transient errors always, server errors up to ``max_server_errors`` attempts."""

    def __init__(self, max_server_errors: int | None) -> None:
        self.max_server_errors = max_server_errors

    def __call__(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome is not None else None
        if exc is None or not is_transient(exc):
            return False
        if is_local_send_failure(exc):
            return True
        if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in SERVER_ERROR_CODES:
            return self.max_server_errors is None or state.attempt_number < self.max_server_errors
        return True


def retrying(
    initial_s: float,
    max_s: float,
    jitter_s: float,
    give_up_after_s: float | None = None,
    max_server_error_attempts: int | None = None,
) -> AsyncRetrying:
    """Exponential backoff with jitter on transient errors; forever unless ``give_up_after_s``.

    With ``max_server_error_attempts``, an UNKNOWN / INTERNAL / DATA_LOSS answer is raised after that many
    attempts instead of being retried forever.
    """
    return AsyncRetrying(
        retry=_RetryPolicy(max_server_error_attempts),
        wait=wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=jitter_s),
        stop=stop_never if give_up_after_s is None else stop_after_delay(give_up_after_s),
        before_sleep=before_sleep_log(log, logging.INFO),
        reraise=True,
        sleep=clocks.current().sleep,
    )
