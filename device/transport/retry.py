"""Which gRPC failures are worth retrying, and the tenacity policy that retries them."""

from __future__ import annotations

import logging

import grpc
from tenacity import AsyncRetrying, before_sleep_log, retry_if_exception, stop_after_delay, stop_never
from tenacity.wait import wait_exponential_jitter

log = logging.getLogger("tandem.device.transport")

TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


class IncompleteTransfer(Exception):
    """A stream ended early (connection cut); the transfer resumes on the next attempt."""


def is_transient(exc: BaseException) -> bool:
    """True for link failures (retry), False for answers the cloud means (auth, bad input)."""
    if isinstance(exc, IncompleteTransfer):
        return True
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in TRANSIENT_CODES
    return isinstance(exc, (ConnectionError, TimeoutError))


def retrying(initial_s: float, max_s: float, jitter_s: float, give_up_after_s: float | None = None) -> AsyncRetrying:
    """Exponential backoff with jitter on transient errors; forever unless ``give_up_after_s``."""
    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=jitter_s),
        stop=stop_never if give_up_after_s is None else stop_after_delay(give_up_after_s),
        before_sleep=before_sleep_log(log, logging.INFO),
        reraise=True,
    )
