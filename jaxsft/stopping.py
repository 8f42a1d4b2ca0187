"""SIGTERM/SIGINT while training or saving its result: a flag the code checks at safe points, not an exception.

One process: a Python signal handler sets the flag. Several processes must stop at the same step (a
checkpoint save is collective), so there JAX's preemption service catches SIGTERM and
`reached_preemption_sync_point` tells every process the agreed step; a SIGINT (Ctrl-C on one host) is
passed on to it as a SIGTERM, else that process alone would stop and the others wait for it forever.
"""

from __future__ import annotations

import os
import signal

import jax


class StopRequest:
    """Inside the `with`, SIGTERM/SIGINT are noted in `signal` instead of interrupting the work."""

    def __init__(self):
        self.signal: int | None = None
        self._received: int | None = None  # what this process got (several processes: `signal` waits for the sync)
        self._previous = {}
        self._multihost = jax.process_count() > 1

    def __enter__(self):
        signals = (signal.SIGINT,) if self._multihost else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self._received = signum
        if not self._multihost:
            self.signal = signum
        elif signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service, which tells every process

    def requested(self, step: int) -> bool:
        """Whether to stop after `step` (every process answers the same at the same step)."""
        if self._multihost:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = self._received or signal.SIGTERM
        return self.signal is not None

    def agreed(self) -> int | None:
        """The signal any process received (the highest number), the same on every process: a collective."""
        if not self._multihost:
            return self.signal
        import numpy as np
        from jax.experimental import multihost_utils
        received = int(np.max(multihost_utils.process_allgather(np.int32(self.signal or self._received or 0))))
        return received or None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
