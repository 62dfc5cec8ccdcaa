"""Many nodes need one output folder that all of them see.

Only the main process writes checkpoints and trainer_state.json, and every process reads them on resume. On
node-local disks a resume would find the checkpoint on node 0 and nothing on node 1: node 1 would start from step 0
while node 0 resumed, and the replicas would silently diverge. So a multi-process run checks first: the main
process writes a file with a fresh token, and every process must read it back.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from ..checkpoints import names
from ..errors import ConfigError

__all__ = ["check_shared_folder"]

VISIBLE_WITHIN = 10.0  # seconds a network file system may take to show another node's new file


def check_shared_folder(accelerator: Accelerator, folder: Path, token: str) -> None:
    """ConfigError on every process unless every process sees the file the main process writes in `folder`."""
    probe = folder / f"{names.SHARED_PROBE}{token}"
    if accelerator.is_main_process:
        probe.write_text(token)
    accelerator.wait_for_everyone()
    seen = _sees(probe, token)
    views = gather_object([(accelerator.process_index, socket.gethostname(), seen)])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [(rank, host) for rank, host, ok in views if not ok]
    if blind:
        who = ", ".join(f"rank {rank} on {host}" for rank, host in blind[:4]) + (" ..." if len(blind) > 4 else "")
        raise ConfigError(
            f"--output-dir {folder} is not shared between the nodes: {who} cannot see the file the main process "
            f"(on {views[0][1]}) wrote there. Rank 0 writes the checkpoints and every rank reads them on resume, so "
            "the output folder must be on storage that every node mounts at the same path (NFS, Lustre, GPFS, ...)")


def _sees(probe: Path, token: str) -> bool:
    deadline = time.monotonic() + VISIBLE_WITHIN
    while time.monotonic() < deadline:
        try:
            os.listdir(probe.parent)  # refreshes an NFS client's view of the folder
            if probe.read_text() == token:
                return True
        except OSError:  # not there (yet), or no such folder on this node at all
            pass
        time.sleep(0.5)
    return False
