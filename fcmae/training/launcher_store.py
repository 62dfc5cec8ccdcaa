"""The launcher's key-value store: where a run's processes leave each other small host-side messages.

Every multi-process run has one: the TCPStore at MASTER_ADDR:MASTER_PORT where the processes met (torchrun's agent
hosts it; without torchrun, rank 0's process group does). Messages there cost a round trip to that host (tens of
microseconds on one node) and never touch the device or a collective, so a step can afford one: who asked to stop,
and at which step (`Run.stop_requested`), and each process's heartbeat (`Watchdog`). Keys are prefixed with the
run's id, so a requeued run never reads its predecessor's.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

__all__ = ["connect_launcher_store"]


def connect_launcher_store(timeout: float = 10.0) -> "torch.distributed.Store | None":
    """A client of its own to the store (a client is not shared between threads), or None if there is none."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return torch.distributed.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout),
                                          wait_for_workers=False)
    except (RuntimeError, ValueError, OSError):
        return None
