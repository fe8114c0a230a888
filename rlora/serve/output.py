"""`OutputThread`: what happens to chosen tokens after the GPU step, off the decode loop's thread:
detokenising, stop-sequence checks, stream events and results, in the order the loop hands
them over. The loop never waits for it; a request a stop sequence ended is closed here, and the
loop sees its handle done and frees its row before the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable


class OutputThread:
    def __init__(self, name: str):
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"rlora-output-{name}", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        self._queue.put(work)

    def close(self, timeout: float | None = 30) -> None:
        """Finish what was submitted, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            try:
                work()
            except Exception:  # noqa: BLE001 - the work closes its own requests on error; the thread must live on
                logging.getLogger(__name__).exception("output of a generation step failed")
