# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Stopping on a signal: SIGINT, SIGTERM or SIGHUP becomes an exception.

Ansible passes the signal that stops ansible-playbook (Ctrl-C, kill, an AWX
job's cancel) on to the module it runs. Python's defaults would end the module
at once, leaving its transfer open and its disk locked; raised as Stopped, the
signal goes up through the code like any failure, so the undo paths on its
way run: the transfer is cancelled or finalized, qemu-nbd stopped, a partial
file removed.
"""

from __future__ import annotations

import contextlib
import signal

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
