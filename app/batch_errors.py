"""Why DynamicBatcher.run has no results for its caller: one exception per answer the caller gives its own client
(app/errors.refusal turns each into its ServiceError)."""

from __future__ import annotations


class BatcherError(Exception):
    """Why run() has no results for the caller; each subclass is one answer the caller gives its own client."""


class QueueFullError(BatcherError):
    """Admitting the items would take the queue past queue_limit; none of them was queued."""

    def __init__(self, retry_after_s: int, message: str | None = None) -> None:
        super().__init__(message or f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class OverloadedError(QueueFullError):
    """The queue has room, but the estimated wait (the images ahead x the recent time per image) is longer than
    what is left of the request's deadline: refused now (429) rather than answered 504 after wasting model time."""

    def __init__(self, retry_after_s: int, estimated_s: float, left_s: float) -> None:
        message = f"estimated wait {estimated_s:.2f} s, {left_s:.2f} s left; retry after {retry_after_s} s"
        super().__init__(retry_after_s, message)
        self.estimated_s = estimated_s
        self.left_s = left_s


class BatcherClosedError(BatcherError):
    """Submitted after shutdown began."""


class DeadlineExceededError(BatcherError):
    """The caller's deadline passed before all its results came; items still queued never reach the model."""


class InferenceFailedError(BatcherError):
    """The model failed on a batch holding one of the caller's items (`cause` is its exception)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause
