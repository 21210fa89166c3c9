# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Small helpers shared by the unit and integration tests."""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager

# The shared lab's wait for a VM to power off after an ACPI shutdown: short,
# so a guest that ignores the button is seen back up soon; ample for the lab's
# guest, which powers off within a second or two.
SHUTDOWN_TIMEOUT = 8.0


def qemu_io(image, fmt, *commands):
    """Write a pattern into an image with qemu-io, e.g. "write -P 0x55 0 1M"."""
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, image], check=True, stdout=subprocess.DEVNULL)


def wait_for_socket(path, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


@contextmanager
def running(cmd, socket):
    """Run a server (qemu-nbd, nbdkit) listening on a unix socket for the block."""
    proc = subprocess.Popen(cmd)
    try:
        wait_for_socket(socket, proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait()


def wait_for(predicate, timeout=30.0, what="condition"):
    """The first true value predicate returns, polling every 0.1 s; an
    AssertionError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)
