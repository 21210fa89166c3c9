# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""qemu-nbd serving volumes as vdsm starts it, optionally behind nbdkit's
delay filter (the slow-storage test hook)."""

from __future__ import annotations

import json
import os
import socket
import time

from lab.host.errors import HostError
from lab.host.process import START_TIMEOUT, Process, tail, unlink

# What vdsm sets: as many NBD clients sharing one qemu-nbd as imageio opens
# connections per ticket.
NBD_SHARED = 8
# Longest server id start_nbd builds a socket name from (a UUID).
NBD_ID_MAX = 36

# What an NBD server sends first on every connection (NBD protocol,
# "Newstyle negotiation").
NBD_GREETING = b"NBDMAGIC"
GREETING_TIMEOUT = 1.0

QEMU_NBD = "qemu-nbd"
NBDKIT = "nbdkit"


class NbdServer:
    """qemu-nbd serving one volume, optionally behind nbdkit's delay filter."""

    def __init__(
        self, host, server_id, volume, readonly, backing, detect_zeroes, discard, delay_ms
    ):
        self.host = host
        self.id = server_id
        self.volume = volume
        self.readonly = readonly
        self.backing = backing
        self.detect_zeroes = detect_zeroes
        self.discard = discard
        self.delay_ms = delay_ms
        self.socket = os.path.join(host.nbd_dir, server_id + ".sock")
        self.url = "nbd:unix:" + self.socket
        self.log_path = os.path.join(host.log_dir, f"nbd-{server_id}.log")
        self._qemu_nbd = None
        self._nbdkit = None

    def start(self):
        unlink(self.socket)
        try:
            if self.delay_ms:
                inner = os.path.join(self.host.nbd_dir, self.id + ".qemu.sock")
                self._qemu_nbd = self._spawn(self._qemu_nbd_argv(inner), "nbd-" + self.id, inner)
                self._nbdkit = self._spawn(
                    self._nbdkit_argv(inner), "nbdkit-" + self.id, self.socket
                )
            else:
                self._qemu_nbd = self._spawn(
                    self._qemu_nbd_argv(self.socket), "nbd-" + self.id, self.socket
                )
        except BaseException:
            self.stop()
            raise

    def stop(self):
        for attr in ("_nbdkit", "_qemu_nbd"):
            process = getattr(self, attr)
            if process is not None:
                process.stop()
                setattr(self, attr, None)
        unlink(self.socket)
        unlink(os.path.join(self.host.nbd_dir, self.id + ".qemu.sock"))

    def pids(self):
        return [p.pid for p in (self._qemu_nbd, self._nbdkit) if p is not None and p.alive()]

    # Private helpers.

    def _qemu_nbd_argv(self, sock):
        direct = supports_direct_io(self.volume.path, self.readonly)
        argv = [
            QEMU_NBD,
            "--socket", sock,
            "--persistent",
            f"--shared={NBD_SHARED}",
            "--export-name=",
            "--cache=" + ("none" if direct else "writeback"),
            "--aio=" + ("native" if direct else "threads"),
        ]  # fmt: skip
        if self.volume.format != "raw":
            argv.append("--allocation-depth")
        if self.readonly:
            argv.append("--read-only")
        else:
            if self.discard:
                argv.append("--discard=unmap")
            if self.detect_zeroes:
                # "unmap" punches holes for zero writes, so only with discard.
                argv.append("--detect-zeroes=" + ("unmap" if self.discard else "on"))
        image = json.loads(self.volume.qemu_json()[len("json:") :])
        if self.volume.format == "qcow2" and not self.backing:
            image["backing"] = None
        argv.append("json:" + json.dumps(image))
        return argv

    def _nbdkit_argv(self, inner):
        delay = f"{self.delay_ms}ms"
        argv = [NBDKIT, "--foreground", "--unix", self.socket, "--filter=delay"]
        if self.readonly:
            argv.append("--readonly")
        argv += [
            "nbd",
            f"socket={inner}",
            f"delay-read={delay}",
            f"delay-write={delay}",
            f"delay-zero={delay}",
            f"delay-trim={delay}",
        ]
        return argv

    def _spawn(self, argv, key, sock):
        process = Process.spawn(argv, self.log_path, self.host.pid_dir, key, sockets=[sock])
        deadline = time.monotonic() + START_TIMEOUT
        while not _greets(sock):
            if not process.alive():
                process.stop()
                raise HostError(
                    f"{argv[0]} exited while starting NBD server {self.id} for volume "
                    f"{self.volume.id}; last lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                process.stop()
                raise HostError(
                    f"{argv[0]} did not create {sock} within {START_TIMEOUT:.0f} s; "
                    f"see {self.log_path}"
                )
            time.sleep(0.02)
        return process


def check_nbd_id(server_id):
    if (
        not isinstance(server_id, str)
        or not 0 < len(server_id) <= NBD_ID_MAX
        or not server_id.replace("-", "").replace("_", "").isalnum()
    ):
        raise HostError(
            f"Invalid NBD server id {server_id!r}: use up to {NBD_ID_MAX} letters, "
            f"digits, '-' and '_'"
        )


def nbd_id(url_or_id) -> str:
    if url_or_id.startswith("nbd:unix:"):
        path = url_or_id[len("nbd:unix:") :].split(":exportname=")[0]
        name = os.path.basename(path)
        return name[: -len(".sock")] if name.endswith(".sock") else name
    return url_or_id


def supports_direct_io(path, readonly) -> bool:
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_DIRECT
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    os.close(fd)
    return True


def _greets(path) -> bool:
    """True once the server at path sends the NBD greeting. qemu-nbd binds
    its socket before it opens the image, so a socket that accepts is not
    yet a server that works: one failing to open the image closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(GREETING_TIMEOUT)
        try:
            s.connect(path)
            greeting = b""
            while len(greeting) < len(NBD_GREETING):
                chunk = s.recv(len(NBD_GREETING) - len(greeting))
                if not chunk:
                    return False
                greeting += chunk
        except OSError:
            return False
        return greeting == NBD_GREETING
