"""Where the monitor's tensor work runs: queued behind the training thread, like a device stream.

On an accelerator the statistics are kernels queued on the device's stream, so the training thread
only pays for launching them. A CPU has no stream: its kernels run on the thread that calls them.
`WorkerLane` gives it one, a single worker thread that runs the monitor's jobs in order while the
training thread goes on (torch releases the GIL inside its kernels), so on a machine with a core to
spare the statistics cost the training thread almost nothing. `InlineLane` runs each job at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

__all__ = ["Lane", "InlineLane", "WorkerLane"]

logger = logging.getLogger(__name__)

Job = Callable[[], None]


class Lane:
    """Runs the monitor's jobs in submission order. A job must catch its own errors."""

    busy_seconds: float = 0.0
    """Wall time spent inside jobs so far."""
    on_caller: bool = True
    """Jobs run on the submitting thread, inside the hook that submits them."""

    def submit(self, job: Job) -> None:
        raise NotImplementedError

    def join(self) -> None:
        """Return once every job submitted so far has finished."""

    def close(self) -> None:
        """Finish the submitted jobs and release the lane. Idempotent."""


def _run(lane: Lane, job: Job) -> None:
    start = time.perf_counter()
    try:
        job()
    except Exception:  # noqa: BLE001 - a statistic must never stop training
        logger.warning("spikedoc: a monitoring job failed", exc_info=True)
    finally:
        lane.busy_seconds += time.perf_counter() - start


class InlineLane(Lane):
    """Runs every job immediately on the calling thread."""

    def submit(self, job: Job) -> None:
        _run(self, job)


class WorkerLane(Lane):
    """Runs jobs in order on one daemon thread; `join` waits for them.

    Example:
        >>> lane, seen = WorkerLane(), []
        >>> for i in range(3):
        ...     lane.submit(lambda i=i: seen.append(i))
        >>> lane.join(); seen
        [0, 1, 2]
        >>> lane.close()
    """

    on_caller = False

    def __init__(self, name: str = "spikedoc-stats") -> None:
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._closed:  # after close(): run it here rather than lose it
            _run(self, job)
            return
        self._jobs.put(job)

    def join(self) -> None:
        if threading.current_thread() is not self._thread:
            self._jobs.join()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                _run(self, job)
            finally:
                self._jobs.task_done()
