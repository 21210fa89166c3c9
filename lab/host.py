# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lab's host data plane and the engine's imageio proxy.

Two real ``ovirt-imageio`` daemons run as on an oVirt setup:

- the host daemon, as vdsm configures it: remote service on the host address
  with TLS, the local unix socket enabled, control over a unix socket;
- the proxy, as engine-setup configures it: remote service on the engine
  address with TLS, no local service, and ``[backend_http] ca_file`` so it can
  reach the host daemon.

Volumes are served with ``qemu-nbd`` exactly as vdsm starts it. Every process
gets a pid file under the run directory, so a later lab process can find and
stop what a crashed one left behind.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from lab import storage

log = logging.getLogger("lab.host")

# Timeouts in seconds. qemu-nbd and the daemon are given as long as vdsm and
# the imageio client give them (ovirt_imageio/_internal/qemu_nbd.py).
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
CONTROL_TIMEOUT = 30.0
# What vdsm sets for the host daemon: 8 connections per ticket, and the same
# number of NBD clients sharing one qemu-nbd.
MAX_CONNECTIONS = 8
NBD_SHARED = 8
# How long the daemon waits for a ticket in use before answering 409.
REMOVE_TIMEOUT = 60
# The daemon's services notice shutdown within this interval; the default
# (1 s) would make every stop take a few seconds.
POLL_INTERVAL = 0.2
# Free ports to try when one picked is taken before the daemon binds it.
FREE_PORT_ATTEMPTS = 3
# Linux limit for a unix socket path (sun_path), including the final NUL.
UNIX_PATH_MAX = 108
# Longest server id start_nbd builds a socket name from (a UUID).
NBD_ID_MAX = 36

CONTROL_OK = (200, 204)
CONTROL_NOT_FOUND = 404
CONTROL_CONFLICT = 409

IMAGEIO = "ovirt-imageio"
QEMU_NBD = "qemu-nbd"
NBDKIT = "nbdkit"


class HostError(Exception):
    """The host cannot do what was asked; the message says why."""


class TicketError(HostError):
    """An imageio control request failed with an HTTP status."""

    def __init__(self, status, reason, daemon):
        super().__init__(f"{daemon}: HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class Host:
    """One oVirt host (its imageio daemon and qemu-nbd servers) plus the
    engine's imageio proxy, all on loopback addresses."""

    def __init__(
        self,
        lab_dir: str,
        pki,
        address: str = "127.0.0.2",
        proxy_address: str = "127.0.0.1",
        name: str = "host1",
        id: str | None = None,
        remove_timeout: int = REMOVE_TIMEOUT,
    ):
        self.lab_dir = os.path.abspath(lab_dir)
        self.pki = pki
        self.address = _loopback("address", address)
        self.proxy_address = _loopback("proxy_address", proxy_address)
        self.name = _check_name(name)
        self.remove_timeout = remove_timeout
        self.log_dir = os.path.join(self.lab_dir, "log")
        self.state_dir = os.path.join(self.lab_dir, "hosts", self.name)
        self.run_dir = _run_dir(self.lab_dir, self.name)
        self.nbd_dir = os.path.join(self.run_dir, "nbd")
        self.pid_dir = os.path.join(self.run_dir, "pids", self.name)
        self.id = self._load_id(id)

        self._lock = threading.RLock()
        # Tickets as last added or extended, so a restarted daemon gets them
        # back; keyed by uuid.
        self._tickets: dict[str, dict] = {}
        self._nbd: dict[str, _NbdServer] = {}
        self._slow_ms = 0
        self._daemon = _Daemon(
            label=f"imageio daemon of {self.name}",
            key=f"imageio-{self.name}",
            host=self,
            address=self.address,
            local=True,
        )
        self._proxy = _Daemon(
            label="imageio proxy",
            key="imageio-proxy",
            host=self,
            address=self.proxy_address,
            local=False,
        )

    def __repr__(self):
        return f"<Host {self.name} {self.address} id={self.id}>"

    @property
    def port(self) -> int | None:
        """Port of the host daemon's remote service (54322 on a real host)."""
        return self._daemon.port

    @property
    def proxy_port(self) -> int | None:
        """Port of the proxy's remote service (54323 on a real engine)."""
        return self._proxy.port

    @property
    def control_socket(self) -> str:
        return self._daemon.control_socket

    @property
    def proxy_control_socket(self) -> str:
        return self._proxy.control_socket

    def start(self):
        """Start both daemons; stale processes of an earlier run go first."""
        with self._lock:
            if self._daemon.running() and self._proxy.running():
                return
            for path in (self.log_dir, self.state_dir, self.nbd_dir, self.pid_dir):
                os.makedirs(path, exist_ok=True)
            daemon_was_running = self._daemon.running()
            if not (daemon_was_running or self._proxy.running() or self._nbd):
                self._reap_stale()
            # File-backend tickets open volumes with O_DIRECT.
            storage.check_direct_io(self.state_dir)
            try:
                self._daemon.start(any_port=True)
                self._proxy.start(any_port=True)
                if not daemon_was_running:
                    for ticket in self._tickets.values():
                        self._daemon.put_ticket(ticket)
            except BaseException:
                self._stop_all()
                raise

    def stop(self):
        """Stop the daemons and every NBD server; remove sockets and pid files."""
        with self._lock:
            self._stop_all()

    def start_imageio(self):
        """Test hook: start the host daemon again on the same port and add
        back the tickets it had, as vdsm would after a restart."""
        with self._lock:
            self._daemon.start()
            for ticket in self._tickets.values():
                self._daemon.put_ticket(ticket)

    def stop_imageio(self):
        """Test hook: stop the host daemon; the proxy and NBD servers stay."""
        with self._lock:
            self._daemon.stop()

    def restart_imageio(self):
        """Test hook: restart the host daemon (same port, same tickets)."""
        with self._lock:
            self._daemon.stop()
            self.start_imageio()

    def transfer_url(self, ticket_id: str) -> str:
        port = self._daemon.require_port()
        return f"https://{_url_host(self.address)}:{port}/images/{ticket_id}"

    def proxy_url(self, ticket_id: str) -> str:
        port = self._proxy.require_port()
        host = "localhost" if self.proxy_address == "127.0.0.1" else self.proxy_address
        return f"https://{_url_host(host)}:{port}/images/{ticket_id}"

    def start_nbd(
        self,
        volume: storage.Volume,
        readonly: bool,
        backing: bool = True,
        detect_zeroes: bool = True,
        discard: bool = False,
        server_id: str | None = None,
    ) -> str:
        """Serve volume with qemu-nbd as vdsm does; return its ``nbd:unix:`` URL.

        server_id (default: the volume id) names the socket; one server per id.
        """
        server_id = server_id or volume.id
        _check_nbd_id(server_id)
        with self._lock:
            if server_id in self._nbd:
                raise HostError(
                    f"NBD server {server_id} is already running: stop it before starting "
                    f"another one for the same id"
                )
            os.makedirs(self.nbd_dir, exist_ok=True)
            os.makedirs(self.pid_dir, exist_ok=True)
            server = _NbdServer(
                self,
                server_id,
                volume,
                readonly=readonly,
                backing=backing,
                detect_zeroes=detect_zeroes,
                discard=discard,
                delay_ms=self._slow_ms,
            )
            server.start()
            self._nbd[server_id] = server
            return server.url

    def stop_nbd(self, url_or_id: str) -> bool:
        """Stop an NBD server by URL or id; False if none was running."""
        server_id = _nbd_id(url_or_id)
        with self._lock:
            server = self._nbd.pop(server_id, None)
            if server is None:
                return False
            server.stop()
            return True

    def nbd_servers(self) -> list[str]:
        """Ids of the running NBD servers."""
        with self._lock:
            return sorted(self._nbd)

    def add_ticket(self, ticket: dict):
        """Add ticket to the host daemon, then the same ticket to the proxy
        with the host's transfer URL. Like the engine, a failure of the proxy
        ticket is logged and the transfer goes on without it."""
        if not isinstance(ticket, dict) or not isinstance(ticket.get("uuid"), str):
            raise HostError(f"Invalid ticket {ticket!r}: a dict with a 'uuid' string is needed")
        ticket_id = ticket["uuid"]
        with self._lock:
            self._daemon.put_ticket(ticket)
            self._tickets[ticket_id] = dict(ticket)
            proxy_ticket = dict(ticket, url=self.transfer_url(ticket_id))
            try:
                self._proxy.put_ticket(proxy_ticket)
            except HostError as e:
                log.warning("Cannot add proxy ticket %s: %s", ticket_id, e)

    def tickets(self) -> list[str]:
        """Ids of the tickets added and not removed yet."""
        with self._lock:
            return sorted(self._tickets)

    def get_ticket(self, ticket_id: str) -> dict | None:
        """The host daemon's view of the ticket, or None if it has none."""
        return self._daemon.get_ticket(ticket_id)

    def extend_ticket(self, ticket_id: str, timeout: int):
        with self._lock:
            self._daemon.patch_ticket(ticket_id, timeout)
            if ticket_id in self._tickets:
                self._tickets[ticket_id]["timeout"] = timeout
            try:
                self._proxy.patch_ticket(ticket_id, timeout)
            except HostError as e:
                log.warning("Cannot extend proxy ticket %s: %s", ticket_id, e)

    def remove_ticket(self, ticket_id: str) -> bool:
        """Remove the ticket from the proxy and the host daemon.

        False when a daemon answers 409 (the ticket is still in use); the
        caller retries later, as the engine does on its next poll.
        """
        with self._lock:
            if not self._proxy.delete_ticket(ticket_id):
                return False
            if not self._daemon.delete_ticket(ticket_id):
                return False
            self._tickets.pop(ticket_id, None)
            return True

    def slow_storage(self, delay_ms: int):
        """Test hook: NBD servers started from now on answer every request
        after delay_ms milliseconds (nbdkit's delay filter in front of
        qemu-nbd); 0 turns it off. File-backend tickets are not affected."""
        if not isinstance(delay_ms, int) or isinstance(delay_ms, bool) or delay_ms < 0:
            raise HostError(f"Invalid delay {delay_ms!r}: use milliseconds >= 0")
        with self._lock:
            self._slow_ms = delay_ms

    def processes(self) -> list[int]:
        """Pids of every process this host runs now."""
        with self._lock:
            pids = [d.pid for d in (self._daemon, self._proxy) if d.running()]
            for server in self._nbd.values():
                pids.extend(server.pids())
            return pids

    # Private helpers.

    def _stop_all(self):
        errors = []
        for server_id in list(self._nbd):
            try:
                self._nbd.pop(server_id).stop()
            except Exception as e:
                errors.append(e)
        for daemon in (self._proxy, self._daemon):
            try:
                daemon.stop()
            except Exception as e:
                errors.append(e)
        self._tickets.clear()
        self._reap_stale()
        if self.run_dir != os.path.join(self.lab_dir, "run"):
            # The short run directory outside the lab directory goes too.
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if errors:
            raise HostError(f"Stopping host {self.name} failed: {errors[0]}") from errors[0]

    def _reap_stale(self):
        for pid_file in _list_dir(self.pid_dir):
            if pid_file.endswith(".json"):
                _Process.reap(os.path.join(self.pid_dir, pid_file))
        for daemon in (self._daemon, self._proxy):
            _unlink(daemon.control_socket)

    def _load_id(self, given) -> str:
        path = os.path.join(self.state_dir, "host.json")
        try:
            with open(path) as f:
                saved = json.load(f)["id"]
        except (OSError, ValueError, KeyError):
            saved = None
        if given is not None:
            try:
                given = str(uuid.UUID(given))
            except (TypeError, ValueError):
                raise HostError(f"Invalid host id {given!r}: use a UUID") from None
        host_id = given or saved or str(uuid.uuid4())
        if host_id != saved:
            os.makedirs(self.state_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump({"id": host_id, "name": self.name}, f)
        return host_id


class _Daemon:
    """One ovirt-imageio process: configuration, life cycle, control API."""

    def __init__(self, label, key, host, address, local):
        self.label = label
        self.key = key
        self.host = host
        self.address = address
        self.local = local
        self.conf_dir = os.path.join(host.state_dir, key)
        self.control_socket = os.path.join(host.run_dir, key + ".sock")
        self.log_path = os.path.join(host.log_dir, key + ".log")
        self.port = None
        self._process = None

    @property
    def pid(self):
        return self._process.pid if self._process else None

    def running(self) -> bool:
        return self._process is not None and self._process.alive()

    def require_port(self) -> int:
        if self.port is None:
            raise HostError(f"The {self.label} was never started: call Host.start() first")
        return self.port

    def start(self, any_port=False):
        """Start on the port used before; with any_port, fall back to free
        ports when there is none yet or it was taken meanwhile."""
        if self.running():
            return
        ports = [self.port] if self.port is not None else []
        if any_port or not ports:
            ports += [None] * FREE_PORT_ATTEMPTS
        for i, port in enumerate(ports):
            port = port or _free_port(self.address)
            try:
                self._start_on(port)
                self.port = port
                return
            except HostError:
                # Another program may take a free port between our probe and
                # the daemon's bind; a fresh port fixes that.
                if i + 1 == len(ports):
                    raise

    def stop(self):
        if self._process is not None:
            self._process.stop()
            self._process = None
        _unlink(self.control_socket)

    def put_ticket(self, ticket):
        body = json.dumps(ticket).encode()
        status, reason = self._control("PUT", ticket["uuid"], body)
        if status not in CONTROL_OK:
            raise TicketError(status, reason, self.label)

    def get_ticket(self, ticket_id):
        status, reason = self._control("GET", ticket_id)
        if status == CONTROL_NOT_FOUND:
            return None
        if status not in CONTROL_OK:
            raise TicketError(status, reason, self.label)
        return json.loads(reason)

    def patch_ticket(self, ticket_id, timeout):
        body = json.dumps({"timeout": timeout}).encode()
        status, reason = self._control("PATCH", ticket_id, body)
        if status not in CONTROL_OK:
            raise TicketError(status, reason, self.label)

    def delete_ticket(self, ticket_id) -> bool:
        status, reason = self._control(
            "DELETE", ticket_id, timeout=self.host.remove_timeout + CONTROL_TIMEOUT
        )
        if status == CONTROL_CONFLICT:
            return False
        if status not in CONTROL_OK:
            raise TicketError(status, reason, self.label)
        return True

    # Private helpers.

    def _start_on(self, port):
        self._write_config(port)
        _unlink(self.control_socket)
        argv = [_imageio_command(), "--conf-dir", self.conf_dir]
        self._process = _Process.spawn(
            argv, self.log_path, self.host.pid_dir, self.key, sockets=[self.control_socket]
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not self._process.alive():
                self._process.stop()
                self._process = None
                raise HostError(
                    f"The {self.label} exited while starting on {self.address}:{port}; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise HostError(
                    f"The {self.label} did not answer on {self.control_socket} within "
                    f"{START_TIMEOUT:.0f} s; see {self.log_path}"
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        # The control service binds last, so once it answers the remote and
        # local services are listening too.
        try:
            self._control("GET", "lab-readiness-probe", timeout=1.0)
            return True
        except HostError:
            return False

    def _write_config(self, port):
        pki = self.host.pki
        cert, key = pki.issue(
            self.key,
            hosts=_cert_hosts(self.address),
            server=True,
            client=False,
        )
        config = {
            "daemon": {
                "systemd_enable": "false",
                "drop_privileges": "false",
                "run_dir": os.path.join(self.host.run_dir, self.key),
                "max_connections": str(MAX_CONNECTIONS),
                "poll_interval": str(POLL_INTERVAL),
            },
            "tls": {
                "enable": "true",
                "key_file": key,
                "cert_file": cert,
                "ca_file": pki.ca_cert,
            },
            "remote": {"host": self.address, "port": str(port)},
            # An empty name makes the daemon pick a random abstract socket,
            # which it reports to clients in OPTIONS.
            "local": {"enable": "true" if self.local else "false", "socket": ""},
            "control": {
                "transport": "unix",
                "socket": self.control_socket,
                "remove_timeout": str(self.host.remove_timeout),
            },
            "backend_http": {"ca_file": pki.ca_cert},
            "handlers": {"keys": "stderr"},
            "logger_root": {"level": "INFO", "handlers": "stderr"},
        }
        parser = configparser.RawConfigParser()
        parser.read_dict(config)
        conf_d = os.path.join(self.conf_dir, "conf.d")
        os.makedirs(conf_d, exist_ok=True)
        os.makedirs(config["daemon"]["run_dir"], exist_ok=True)
        with open(os.path.join(conf_d, "50-lab.conf"), "w") as f:
            parser.write(f)

    def _control(self, method, ticket_id, body=None, timeout=CONTROL_TIMEOUT):
        con = _UnixHTTPConnection(self.control_socket, timeout)
        try:
            headers = {}
            if body is not None:
                headers["Content-Type"] = "application/json"
            con.request(method, "/tickets/" + ticket_id, body=body, headers=headers)
            resp = con.getresponse()
            data = resp.read()
            return resp.status, data.decode("utf-8", errors="replace")
        except OSError as e:
            raise HostError(
                f"The {self.label} does not answer on {self.control_socket}: {e}"
            ) from None
        except http.client.HTTPException as e:
            raise HostError(f"The {self.label} sent a bad control reply: {e!r}") from None
        finally:
            con.close()


class _NbdServer:
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
        _unlink(self.socket)
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
        _unlink(self.socket)
        _unlink(os.path.join(self.host.nbd_dir, self.id + ".qemu.sock"))

    def pids(self):
        return [p.pid for p in (self._qemu_nbd, self._nbdkit) if p is not None and p.alive()]

    # Private helpers.

    def _qemu_nbd_argv(self, sock):
        direct = _supports_direct_io(self.volume.path, self.readonly)
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
        process = _Process.spawn(argv, self.log_path, self.host.pid_dir, key, sockets=[sock])
        deadline = time.monotonic() + START_TIMEOUT
        while not _unix_socket_answers(sock):
            if not process.alive():
                process.stop()
                raise HostError(
                    f"{argv[0]} exited while starting NBD server {self.id} for volume "
                    f"{self.volume.id}; last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                process.stop()
                raise HostError(
                    f"{argv[0]} did not create {sock} within {START_TIMEOUT:.0f} s; "
                    f"see {self.log_path}"
                )
            time.sleep(0.02)
        return process


class _Process:
    """A child process with a pid file naming it, so that a later lab process
    can stop it even after this one died."""

    def __init__(self, popen, pid_file, sockets):
        self.popen = popen
        self.pid = popen.pid
        self.pid_file = pid_file
        self.sockets = sockets

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
        info = {"pid": popen.pid, "start": _start_time(popen.pid), "argv": argv, "sockets": sockets}
        _write_json(pid_file, info)
        return cls(popen, pid_file, sockets)

    @staticmethod
    def reap(pid_file):
        """Stop the process a pid file names, if it still is that process."""
        try:
            with open(pid_file) as f:
                info = json.load(f)
        except (OSError, ValueError):
            _unlink(pid_file)
            return
        pid = info.get("pid")
        if isinstance(pid, int) and _start_time(pid) == info.get("start"):
            _terminate_foreign(pid, info.get("start"))
        for path in info.get("sockets", ()):
            _unlink(path)
        _unlink(pid_file)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self):
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop on SIGTERM, killing it", self.pid)
                self.popen.kill()
                self.popen.wait()
        for path in self.sockets:
            _unlink(path)
        _unlink(self.pid_file)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket, for imageio's control service."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _run_dir(lab_dir, name) -> str:
    """The run directory for sockets: <lab dir>/run unless socket paths
    would be too long there, then a short directory under the temp dir."""
    run_dir = os.path.join(lab_dir, "run")
    longest = os.path.join(run_dir, "nbd", "x" * NBD_ID_MAX + ".qemu.sock")
    if len(longest.encode()) < UNIX_PATH_MAX:
        return run_dir
    digest = hashlib.sha1(f"{lab_dir}\0{name}".encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"lab-run-{digest}")


def _imageio_command() -> str:
    # The daemon installed beside the running interpreter (the venv) first.
    candidate = os.path.join(os.path.dirname(sys.executable), IMAGEIO)
    if os.access(candidate, os.X_OK):
        return candidate
    return IMAGEIO


def _cert_hosts(address):
    hosts = ["localhost", address]
    if address != "127.0.0.1":
        hosts.append("127.0.0.1")
    return tuple(hosts)


def _loopback(what, address) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except (TypeError, ValueError):
        raise HostError(f"Invalid {what} {address!r}: use a loopback IP address") from None
    if not ip.is_loopback:
        raise HostError(
            f"Invalid {what} {address!r}: the lab listens on loopback addresses only "
            f"(127.0.0.0/8 or ::1)"
        )
    return str(ip)


def _url_host(host) -> str:
    return f"[{host}]" if ":" in host else host


def _check_name(name) -> str:
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise HostError(f"Invalid host name {name!r}: use letters, digits, '-' and '_'")
    return name


def _check_nbd_id(server_id):
    if (
        not isinstance(server_id, str)
        or not 0 < len(server_id) <= NBD_ID_MAX
        or not server_id.replace("-", "").replace("_", "").isalnum()
    ):
        raise HostError(
            f"Invalid NBD server id {server_id!r}: use up to {NBD_ID_MAX} letters, "
            f"digits, '-' and '_'"
        )


def _nbd_id(url_or_id) -> str:
    if url_or_id.startswith("nbd:unix:"):
        path = url_or_id[len("nbd:unix:") :].split(":exportname=")[0]
        name = os.path.basename(path)
        return name[: -len(".sock")] if name.endswith(".sock") else name
    return url_or_id


def _free_port(address) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _supports_direct_io(path, readonly) -> bool:
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_DIRECT
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    os.close(fd)
    return True


def _unix_socket_answers(path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def _start_time(pid):
    """The process start time in clock ticks since boot, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start = fields[0], fields[19]
    if state == "Z":
        return None
    return int(start)


def _terminate_foreign(pid, start):
    """Stop a process that is not our child: SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _start_time(pid) == start:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def _tail(path, lines=20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        return f"(cannot read: {e})"
    return "\n".join(text.splitlines()[-lines:])


def _list_dir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _unlink(path):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_json(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
