"""Fault injection for the kill tests (the base layer: atomic writes and every stage use it)."""

from __future__ import annotations

import os

FAULT_ENV = "PREP_FAULT"  # tests only: "POINT:N" kills the process the Nth time POINT is reached
_fault_hits: dict[str, int] = {}


def fault_point(point: str) -> None:
    """Fault injection for the kill tests: with PREP_FAULT=POINT:N set, the Nth arrival at
    POINT in this process kills it with SIGKILL (no cleanup, like a preempted worker).
    Unset (always, outside tests), this is one dictionary lookup."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] >= int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
