"""Agreement on failure: a checkpoint error on one rank becomes the same CheckpointError on every rank.

Save and load alternate local work (file writes and reads, which may fail on one rank only) with
agreements, collectives that every rank reaches whatever happened locally:

    result, error = attempt(local_work)          # never raises: any exception becomes a message
    payloads = agree("saving checkpoint X", error, result)   # raises together, or returns every payload

No rank is ever left alone in a collective waiting for the timeout (under NCCL a failed peer does not
close its connections; survivors would hang until the watchdog): local work holds no collectives.
"""
from __future__ import annotations

import traceback
from typing import Any, Callable, TypeVar

import torch.distributed as dist

from parallel.checkpoint.files import CheckpointError

T = TypeVar("T")


def describe(e: BaseException) -> str:
    """One line naming what failed: a CheckpointError's message (it names its file or folder), else
    the exception and the source line that raised it."""
    if isinstance(e, CheckpointError):
        text = str(e)
    else:
        frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        where = f" (at {frame.filename}:{frame.lineno})" if frame else ""
        text = f"{type(e).__name__}: {e}{where}"
    return " ".join(text.split())


def attempt(work: Callable[..., T], *args: Any) -> tuple[T | None, str | None]:
    """(work(*args), None), or (None, what went wrong) for any exception."""
    try:
        return work(*args), None
    except Exception as e:  # anything: a rank that raised here would skip the next agreement and hang the rest
        return None, describe(e)


def agree(what: str, error: str | None, payload: Any = None) -> list[Any]:
    """Collective: every rank's payload, in rank order, when no rank failed; otherwise a CheckpointError
    on every rank naming the first failing rank and its message."""
    everyone: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(everyone, (error, payload))
    except RuntimeError as e:  # a peer process died (gloo: "Connection closed by peer")
        raise CheckpointError(f"{what} failed: a rank left the job ({describe(e)})") from None
    failed = [(rank, err) for rank, (err, _) in enumerate(everyone) if err is not None]
    if failed:
        rank, message = failed[0]
        others = f" (and on {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        raise CheckpointError(f"{what} failed on rank {rank}{others}: {message}")
    return [p for _, p in everyone]
