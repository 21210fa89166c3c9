# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Progress of a long transfer, as a small JSON record on the node.

An Ansible module cannot print while it runs: its output is one JSON
document at the end. So a module started with ``async`` writes its progress
to a file, and the role that started it reads that file, with the async job's
own record, and prints a line per running disk (see docs/progress.md). The
record is replaced atomically, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import threading
import time

# Seconds between two writes of the record.
INTERVAL = 1.0


class Progress:
    """Writes {phase, size, done, percent, rate, eta} to a file, at most once a second."""

    def __init__(self, path=None, description="", interval=INTERVAL):
        self.path = path
        self.description = description
        self.interval = interval
        self.phase = "starting"
        self.size = 0
        self.done = 0
        self._start = None
        self._written = 0.0
        self._lock = threading.Lock()

    def set_phase(self, phase, size=None):
        with self._lock:
            self.phase = phase
            if size is not None:
                self.size = size
            self._write(force=True)

    def update(self, stats):
        """A copy callback: stats has .size, .done and .start (monotonic)."""
        with self._lock:
            self.size = stats.size
            self.done = stats.done
            self._start = stats.start
            self._write(force=False)

    def remove(self):
        for path in (self.path, f"{self.path}.tmp"):
            if path and os.path.exists(path):
                os.unlink(path)

    def record(self):
        elapsed = time.monotonic() - self._start if self._start else 0.0
        rate = int(self.done / elapsed) if elapsed > 0 else 0
        left = self.size - self.done
        return {
            "description": self.description,
            "phase": self.phase,
            "size": self.size,
            "done": self.done,
            "percent": round(100.0 * self.done / self.size, 1) if self.size else 0.0,
            "rate": rate,
            "eta": int(left / rate) if rate and left > 0 else None,
            "updated": time.time(),
        }

    def _write(self, force):
        if not self.path:
            return
        now = time.monotonic()
        if not force and now - self._written < self.interval:
            return
        self._written = now
        write_json(self.path, self.record())


def write_json(path, data):
    """Replace path with data as JSON, atomically (a reader never sees half
    of it) and private to the user, as every file the collection keeps
    state in."""
    tmp = f"{path}.tmp"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
