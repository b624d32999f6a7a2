"""Named crash points for fault-injection tests: `GALLERYMATCH_KILL_AT=<point>` kills the process there (SIGKILL).

Read from the environment on purpose (a test harness sets it for one subprocess); unset, it costs one lookup.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    """Die here, as a power cut would, when this point is the one named in GALLERYMATCH_KILL_AT."""
    if os.environ.get("GALLERYMATCH_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
