# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Stopping on a signal, or when nothing follows the module any more.

SIGINT, SIGTERM or SIGHUP becomes an exception.

Ansible passes the signal that stops ansible-playbook (Ctrl-C, kill, an AWX
job's cancel) on to the module it runs. Python's defaults would end the module
at once, leaving its transfer open and its disk locked; raised as Stopped, the
signal goes up through the code like any failure, so the undo paths on its
way run: the transfer is cancelled or finalized, qemu-nbd stopped, a partial
file removed.

A module a role runs in the background (async) gets no signal when
ansible-playbook stops: it runs on by itself. The role touches a heartbeat
file while it follows the module; once the module has seen it touched, a
heartbeat older than its timeout stops the module the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(Exception):
    """A signal asked the module to stop."""


@contextlib.contextmanager
def stop_on_signals():
    """In the block, the first stop signal raises Stopped in the main thread.

    Later ones are ignored, so that a second Ctrl-C or a cancel sent twice
    does not cut the undo short; every step of the undo has its own timeout.
    """

    def stop(signo, _frame):
        for signo_ in STOP_SIGNALS:
            signal.signal(signo_, signal.SIG_IGN)
        raise Stopped(f"stopped by {signal.Signals(signo).name}")

    previous = {signo: signal.signal(signo, stop) for signo in STOP_SIGNALS}
    try:
        yield
    finally:
        for signo, handler in previous.items():
            signal.signal(signo, handler)


class Heartbeat:
    """A file the follower of the module touches; check() raises Stopped
    when it has not been touched for timeout seconds, once it has been
    touched since the module started."""

    def __init__(self, path, timeout, interval=1.0):
        self.path = path
        self.timeout = timeout
        self.interval = interval
        self._started = time.time()
        self._armed = False
        self._checked = 0.0

    def check(self):
        now = time.monotonic()
        if now - self._checked < self.interval:
            return
        self._checked = now
        try:
            touched = os.stat(self.path).st_mtime
        except OSError:
            touched = None
        if not self._armed:
            self._armed = touched is not None and touched >= self._started
            return
        if touched is None or time.time() - touched > self.timeout:
            raise Stopped(
                f"stopped: nothing followed the module for {self.timeout:g} s "
                f"(heartbeat_file {self.path} not touched), as when the playbook that "
                "started it stops"
            )
