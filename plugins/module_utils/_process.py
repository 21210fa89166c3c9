# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Processes seen through /proc: command lines, start times, whether they
are gone; signals, and children that die with their parent."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import time
from contextlib import suppress

# prctl(2) option: signal the child gets when its parent thread exits.
PR_SET_PDEATHSIG = 1


# Pauses between looks at a starting or stopping qemu-nbd: first and longest.
POLL_START = 0.005


POLL_MAX = 0.1


def cmdline(pid):
    """argv of a live process; [] when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0")[:-1]]


def proc_stat(path):
    """The fields of a /proc stat file after the command name, from the
    state on (proc(5)); None when the process or thread is gone."""
    try:
        with open(path) as f:
            # "pid (comm) state ppid pgrp session ..."; comm may hold spaces.
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid):
    """When the process started, in clock ticks since boot (None when it is
    gone): with the pid, it names one process, as pids are reused."""
    fields = proc_stat(f"/proc/{pid}/stat")
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_session_leader(pid):
    """Whether pid leads its session, as a daemonized qemu-nbd --fork does."""
    fields = proc_stat(f"/proc/{pid}/stat")
    return fields is not None and int(fields[3]) == pid


def is_gone(pid):
    """Whether every thread of pid has exited.

    A zombie has exited; only its parent (often init) can reap it. The
    main thread may turn zombie before the others, which still hold the
    process's files and sockets.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for task in tasks:
        fields = proc_stat(f"/proc/{pid}/task/{task}/stat")
        if fields is not None and fields[0] not in ("Z", "X"):
            return False
    return True


def wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    pause = POLL_START
    while not is_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, POLL_MAX)
    return True


def send_signal(pid, signo):
    with suppress(ProcessLookupError):
        os.kill(pid, signo)


@functools.lru_cache(maxsize=None)
def _prctl():
    # The process image links libc, so its symbols are at hand.
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent_hook():
    """Return a preexec_fn making the child get SIGTERM when its parent thread dies.

    So a qemu-nbd whose owner dies without cleaning up (SIGKILL, crash) does
    not linger. Resolved here, in the parent: between fork and exec the
    child must only make the system call.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    return functools.partial(prctl, PR_SET_PDEATHSIG, signal.SIGTERM)
