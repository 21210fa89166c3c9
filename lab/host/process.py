# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Child processes of the host with pid files, so that a later lab process
can find and stop what a crashed one left behind, and the small file and
socket helpers they share."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time

from lab.host.errors import HostError

log = logging.getLogger("lab.host")

# Timeouts in seconds. qemu-nbd and the daemon are given as long as vdsm and
# the imageio client give them (ovirt_imageio/_internal/qemu_nbd.py).
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class Process:
    """A child process with a pid file naming it, so that a later lab process
    can stop it even after this one died, or take it over (adopt)."""

    def __init__(self, popen, pid_file, sockets, pid=None, start=None):
        self.popen = popen
        self.pid = popen.pid if popen is not None else pid
        self.start = start
        self.pid_file = pid_file
        self.sockets = sockets

    @classmethod
    def adopt(cls, pid_file):
        """The still running process a pid file names, or None."""
        try:
            with open(pid_file) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return None
        pid = info.get("pid")
        if not isinstance(pid, int) or start_time(pid) != info.get("start"):
            return None
        return cls(None, pid_file, info.get("sockets", []), pid=pid, start=info["start"])

    @classmethod
    def spawn(cls, argv, log_path, pid_dir, key, sockets=()):
        """Start argv with output to log_path; sockets are the unix sockets
        it creates, removed whenever the process is stopped or reaped."""
        sockets = list(sockets)
        os.makedirs(pid_dir, exist_ok=True)
        pid_file = os.path.join(pid_dir, key + ".json")
        cls.reap(pid_file)
        with open(log_path, "ab") as log_file:
            log_file.write(f"--- {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
            log_file.flush()
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    # Out of the caller's process group: a Ctrl-C meant for
                    # the lab must not kill servers before the lab stops them.
                    start_new_session=True,
                )
            except FileNotFoundError:
                raise HostError(f"{argv[0]} not found: install it (see bindep.txt)") from None
        info = {"pid": popen.pid, "start": start_time(popen.pid), "argv": argv, "sockets": sockets}
        write_json(pid_file, info)
        return cls(popen, pid_file, sockets)

    @staticmethod
    def reap(pid_file):
        """Stop the process a pid file names, if it still is that process."""
        try:
            with open(pid_file) as f:
                info = json.load(f)
        except (OSError, ValueError):
            unlink(pid_file)
            return
        pid = info.get("pid")
        if isinstance(pid, int) and start_time(pid) == info.get("start"):
            terminate_foreign(pid, info.get("start"))
        for path in info.get("sockets", ()):
            unlink(path)
        unlink(pid_file)

    def alive(self) -> bool:
        if self.popen is None:
            return start_time(self.pid) == self.start
        return self.popen.poll() is None

    def wait_exit(self, timeout) -> bool:
        """Whether the process has exited within timeout seconds."""
        if self.popen is None:
            return wait_gone(self.pid, self.start, timeout)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self):
        if self.popen is None:
            if self.alive():
                terminate_foreign(self.pid, self.start)
        elif self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop on SIGTERM, killing it", self.pid)
                self.popen.kill()
                self.popen.wait()
        for path in self.sockets:
            unlink(path)
        unlink(self.pid_file)


def free_port(address) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def start_time(pid):
    """The process start time in clock ticks since boot, or None if gone."""
    fields = _stat(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


def alive(pid) -> bool:
    """Whether the process runs (a zombie waiting for its parent does not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _stat(pid):
    """The fields of /proc/PID/stat from the state on, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses.
    return stat[stat.rindex(")") + 2 :].split()


def terminate_foreign(pid, start):
    """Stop a process that is not our child: SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, start, STOP_TIMEOUT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_gone(pid, start, timeout) -> bool:
    """Whether the process pid, started at start (clock ticks since boot), is
    gone within timeout seconds."""
    deadline = time.monotonic() + timeout
    while start_time(pid) == start:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def tail(path, lines=20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        return f"(cannot read: {e})"
    return "\n".join(text.splitlines()[-lines:])


def list_dir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def unlink(path):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_json(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
