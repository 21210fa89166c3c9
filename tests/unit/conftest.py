# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Fixtures for unit tests: real NBD servers (qemu-nbd, nbdkit) and TLS certificates."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from lab.pki import Pki

SERVER_START_TIMEOUT = 10
SERVER_STOP_TIMEOUT = 10


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_pids():
    """Process ids of the children of this process."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids.update(int(pid) for pid in f.read().split())
    return pids


def open_fds():
    """File descriptors open in this process, with what they point to."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        # The descriptor that listed the directory is gone by now.
        with contextlib.suppress(FileNotFoundError):
            fds[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
    return fds


class Server:
    """An NBD server process started for one test.

    ``url`` is nbd+unix:///EXPORT?socket=PATH or nbd://127.0.0.1:PORT/EXPORT
    (nbds… with TLS); ``log`` holds the server's stderr.
    """

    def __init__(self, argv, transport, socket_path, port, export, tls, log):
        self.argv = argv
        self.transport = transport
        self.socket = socket_path
        self.port = port
        self.export = export
        self.tls = tls
        self.log = log
        self.proc = None

    @property
    def url(self):
        scheme = "nbds" if self.tls else "nbd"
        export = quote(self.export, safe="/")
        if self.transport == "unix":
            return f"{scheme}+unix:///{export}?socket={self.socket}"
        return f"{scheme}://127.0.0.1:{self.port}/{export}"

    def start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=log)
        self._wait_listening()
        return self

    def stop(self):
        """Terminate the server and remove its unix socket."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.socket and os.path.exists(self.socket):
            # qemu-nbd removes its socket on exit; nbdkit leaves it.
            os.unlink(self.socket)
            if self.argv[0] == "qemu-nbd":
                raise AssertionError(f"qemu-nbd left its socket {self.socket} behind")

    def kill(self):
        """Kill the server at once, as a crash would."""
        self.proc.kill()
        self.proc.wait()
        if self.socket and os.path.exists(self.socket):
            os.unlink(self.socket)

    def stderr(self):
        return Path(self.log).read_text(errors="replace")

    def _wait_listening(self):
        # A connection that succeeds means the server accepts clients; qemu-nbd
        # runs with --persistent (nbdkit always is) so the probe costs nothing.
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.argv[0]} exited with {self.proc.returncode}: {self.stderr()}"
                )
            try:
                if self.transport == "unix":
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                        sock.connect(self.socket)
                else:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"{self.argv[0]} did not listen within 10 s") from None
                time.sleep(0.01)


class Servers:
    """Starts qemu-nbd and nbdkit for a test and stops them all afterwards."""

    def __init__(self, directory):
        self._dir = directory
        self._servers = []

    def qemu_nbd(
        self,
        image,
        fmt="raw",
        *args,
        transport="unix",
        export="",
        tls_dir=None,
    ):
        """qemu-nbd serving image; args are extra qemu-nbd options.

        --persistent keeps it serving after the readiness probe and between
        the clients of a test.
        """
        argv = ["qemu-nbd", "--format", fmt, "--export-name", export, "--persistent"]
        if tls_dir is not None:
            argv += [
                "--object",
                f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server",
                "--tls-creds",
                "tls0",
            ]
        socket_path, port = self._endpoint(transport)
        if transport == "unix":
            argv += ["--socket", socket_path]
        else:
            argv += ["--bind", "127.0.0.1", "--port", str(port)]
        argv += [*args, str(image)]
        return self._start(argv, transport, socket_path, port, export, tls_dir is not None)

    def nbdkit(self, plugin, *params, filters=(), options=(), transport="unix", export=""):
        """nbdkit with plugin, filters, extra nbdkit options and plugin/filter params."""
        argv = ["nbdkit", "--foreground", "--exit-with-parent", "--exportname", export]
        socket_path, port = self._endpoint(transport)
        if transport == "unix":
            argv += ["--unix", socket_path]
        else:
            argv += ["--ipaddr", "127.0.0.1", "--port", str(port)]
        argv += [f"--filter={name}" for name in filters]
        argv += [*options, plugin, *params]
        tls = "--tls=require" in options
        return self._start(argv, transport, socket_path, port, export, tls)

    def stop_all(self):
        errors = []
        for server in reversed(self._servers):
            try:
                server.stop()
            except AssertionError as e:
                errors.append(str(e))
        self._servers.clear()
        assert not errors, errors

    def _endpoint(self, transport):
        n = len(self._servers)
        if transport == "unix":
            return os.path.join(self._dir, f"nbd{n}.sock"), None
        if transport == "tcp":
            return None, free_port()
        raise ValueError(f"unknown transport {transport!r}")

    def _start(self, argv, transport, socket_path, port, export, tls):
        log = os.path.join(self._dir, f"server{len(self._servers)}.log")
        server = Server(argv, transport, socket_path, port, export, tls, log)
        self._servers.append(server)
        return server.start()


@pytest.fixture
def nbd_servers(tmp_path):
    """Factory for real NBD servers on a private directory; all stopped after the test."""
    # Unix socket paths must stay short (108 bytes); tmp_path can be long.
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"nbd-{os.getpid()}-{time.monotonic_ns()}"
    directory.mkdir(mode=0o700)
    servers = Servers(str(directory))
    try:
        yield servers
    finally:
        try:
            servers.stop_all()
        finally:
            shutil.rmtree(directory)


class TLSCerts:
    """Certificate directories in the layout qemu and nbdkit expect.

    server: ca-cert.pem, server-cert.pem, server-key.pem (for 127.0.0.1 and localhost)
    client: ca-cert.pem, client-cert.pem, client-key.pem
    ca_only: ca-cert.pem alone (a client without a certificate)
    rogue: a CA that did not sign the server, with the client certificate
    """

    def __init__(self, root):
        self.root = root
        self.server = str(root / "server")
        self.client = str(root / "client")
        self.ca_only = str(root / "ca-only")
        self.rogue = str(root / "rogue")


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory):
    """A CA, a server and a client certificate, and a rogue CA, from the lab's PKI."""
    root = tmp_path_factory.mktemp("tls")
    ca = Pki(str(root / "ca"))
    rogue = Pki(str(root / "rogue-ca"))
    ca.qemu_dir("server", str(root / "server"))
    client = ca.qemu_dir("client", str(root / "client"))
    (root / "ca-only").mkdir()
    shutil.copy(ca.ca_cert, root / "ca-only" / "ca-cert.pem")
    (root / "rogue").mkdir()
    shutil.copy(rogue.ca_cert, root / "rogue" / "ca-cert.pem")
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(os.path.join(client, name), root / "rogue" / name)
    return TLSCerts(root)
