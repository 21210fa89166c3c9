# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Transfers on record: what a module killed without warning left open.

Each image transfer a module starts is written down on the node, with the
module's process, until the transfer has ended. A module killed with SIGKILL,
or by a reboot, cannot end its transfer, which then keeps its disk locked
until the engine's inactivity timeout. The next transfer module run on the
node ends such transfers first, as the module would have: an upload to a
new disk is cancelled (the engine removes the disk), anything else
finalized. Records live in $XDG_STATE_HOME/thinair.ovirt/transfers (by
default ~/.local/state/...), one private file per transfer.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os

from ansible_collections.thinair.ovirt.plugins.module_utils import _engine, _process, _progress


def directory():
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "thinair.ovirt", "transfers")


class Record:
    """The record of one transfer this process started."""

    def __init__(self, engine_url, transfer_id, disk_id, direction, keep_disk):
        self.path = os.path.join(directory(), f"{transfer_id}.json")
        self.data = {
            "engine_url": engine_url,
            "transfer_id": transfer_id,
            "disk_id": disk_id,
            "direction": direction,
            "keep_disk": keep_disk,
            "pid": os.getpid(),
            "start": _process.process_start(os.getpid()),
        }

    def save(self):
        """Write the record; a node where it cannot be written (no writable
        home) goes without, as the record is only a safety net."""
        try:
            os.makedirs(directory(), mode=0o700, exist_ok=True)
            _progress.write_json(self.path, self.data)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(self.path + ".tmp")

    def remove(self):
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def end_stale(engine):
    """End the transfers on record for this engine whose module is gone;
    one line for each, saying what was done."""
    lines = []
    for path in sorted(glob.glob(os.path.join(directory(), "*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
            if data["engine_url"] != engine.url:
                continue
            if _process.process_start(data["pid"]) == data["start"]:
                continue
            transfer_id, disk_id = data["transfer_id"], data["disk_id"]
            direction, keep_disk = data["direction"], data["keep_disk"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        transfer = engine.transfer(transfer_id)
        if transfer is None or str(transfer.phase).startswith("finished_"):
            os.unlink(path)
            continue
        what = f"transfer {transfer_id} of disk {disk_id}, left open by process {data['pid']}"
        try:
            engine.undo_transfer(transfer_id, direction, disk_id, keep_disk=keep_disk)
        except _engine.EngineError as e:
            lines.append(f"cannot end {what}: {e}")
            continue
        if direction == "upload" and not keep_disk:
            lines.append(f"cancelled {what}; the engine removed the new disk")
        else:
            lines.append(f"finalized {what}")
        os.unlink(path)
    return lines
