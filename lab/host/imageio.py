# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The real ovirt-imageio daemons: the host's and the engine's proxy.

- the host daemon, as vdsm configures it: remote service on the host address
  with TLS, the local unix socket enabled, control over a unix socket;
- the proxy, as engine-setup configures it: remote service on the engine
  address with TLS, no local service, and ``[backend_http] ca_file`` so it can
  reach the host daemon.
"""

from __future__ import annotations

import configparser
import http.client
import json
import os
import socket
import sys
import time

from lab.host.errors import HostError, TicketError
from lab.host.process import START_TIMEOUT, Process, free_port, tail, unlink

# Seconds a control request may take.
CONTROL_TIMEOUT = 30.0
# What vdsm sets for the host daemon: 8 connections per ticket, and the same
# number of NBD clients sharing one qemu-nbd.
MAX_CONNECTIONS = 8
# How long the daemon waits for a ticket in use before answering 409.
REMOVE_TIMEOUT = 60
# The daemon's services notice shutdown within this interval; the default
# (1 s) would make every stop take a few seconds.
POLL_INTERVAL = 0.2
# Free ports to try when one picked is taken before the daemon binds it.
FREE_PORT_ATTEMPTS = 3

CONTROL_OK = (200, 204)
CONTROL_NOT_FOUND = 404
CONTROL_CONFLICT = 409

IMAGEIO = "ovirt-imageio"


class Daemon:
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
            port = port or free_port(self.address)
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
        unlink(self.control_socket)

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
        unlink(self.control_socket)
        argv = [imageio_command(), "--conf-dir", self.conf_dir]
        self._process = Process.spawn(
            argv, self.log_path, self.host.pid_dir, self.key, sockets=[self.control_socket]
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not self._process.alive():
                self._process.stop()
                self._process = None
                raise HostError(
                    f"The {self.label} exited while starting on {self.address}:{port}; "
                    f"last lines of {self.log_path}:\n{tail(self.log_path)}"
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
            hosts=cert_hosts(self.address),
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
        con = UnixHTTPConnection(self.control_socket, timeout)
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


class UnixHTTPConnection(http.client.HTTPConnection):
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


def imageio_command() -> str:
    # The daemon installed beside the running interpreter (the venv) first.
    candidate = os.path.join(os.path.dirname(sys.executable), IMAGEIO)
    if os.access(candidate, os.X_OK):
        return candidate
    return IMAGEIO


def cert_hosts(address):
    hosts = ["localhost", address]
    if address != "127.0.0.1":
        hosts.append("127.0.0.1")
    return tuple(hosts)
