# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Start, stop and query a whole lab (engine + host) living in one directory.

``Lab(dir).start()`` runs the lab in a background process (``python -m lab
serve``) and returns once the engine answers; ``stop()`` ends that process,
which stops the imageio daemons and every qemu-nbd it started; anything a
crashed lab left behind is reaped from the pid files. The CLI, the pytest
fixture and the molecule scenario all use this class.

Layout of the directory::

    lab.json            settings kept across restarts (port, password, ...)
    password            the admin password, for ``ovirt-img --password-file``
    pki/                the lab CA and certificates
    engine/engine.db    the engine's database
    domains/            storage domains and their volumes
    hosts/, run/        host state, sockets and pid files
    log/engine.log      the engine's log (imageio and qemu-nbd logs beside it)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

from lab.host.process import alive

USERNAME = "admin@internal"
DEFAULT_HOST_ADDRESS = "127.0.0.2"
ENGINE_ADDRESS = "127.0.0.1"
START_TIMEOUT = 60.0
# Settings in seconds kept across restarts, and their defaults: how often open
# transfers are visited, vdsm's wait for a guest agent before a VM is up, and
# how long a VM may take to shut down before it is reported up again.
TIMINGS = {"poll_interval": 1.0, "guest_wait_timeout": 60.0, "shutdown_timeout": 120.0}
STOP_TIMEOUT = 30.0

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LabError(Exception):
    """The lab cannot be started, stopped or reached; the message says why."""


class Lab:
    def __init__(self, directory: str):
        self.dir = os.path.abspath(directory)
        self.config_path = os.path.join(self.dir, "lab.json")
        self.password_path = os.path.join(self.dir, "password")
        self.run_path = os.path.join(self.dir, "run", "engine.json")
        self.log_path = os.path.join(self.dir, "log", "engine.log")
        self._child: subprocess.Popen | None = None

    def start(
        self,
        host_address: str | None = None,
        stock: bool | None = None,
        port: int | None = None,
        poll_interval: float | None = None,
        timeout: float = START_TIMEOUT,
        guest_wait_timeout: float | None = None,
        shutdown_timeout: float | None = None,
    ) -> dict:
        """Start the lab in the background and return its info; a running lab
        is returned as it is. Settings left out keep the value of the lab's
        last start (see ``TIMINGS`` for the defaults)."""
        running = self._running_info()
        if running is not None:
            wanted = host_address or running["host"]["address"]
            if wanted != running["host"]["address"]:
                raise LabError(
                    f"The lab in {self.dir} is running with host address "
                    f"{running['host']['address']}: stop it before changing it to {wanted}"
                )
            return running
        timings = {
            "poll_interval": poll_interval,
            "guest_wait_timeout": guest_wait_timeout,
            "shutdown_timeout": shutdown_timeout,
        }
        config = self._update_config(host_address, stock, port, timings)
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        os.makedirs(os.path.dirname(self.run_path), exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "ab") as log_file:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "lab", "serve", "--dir", self.dir],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=env,
                cwd=self.dir,
                start_new_session=True,
            )
        try:
            return self._wait_started(self._child, config, timeout)
        except BaseException:
            self._kill_child()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT) -> dict:
        """Stop the lab; processes a crashed lab left are stopped too."""
        pid = _read_json(self.run_path, {}).get("pid")
        stopped = False
        if isinstance(pid, int) and _is_lab_process(pid, self.dir):
            stopped = True
            os.kill(pid, signal.SIGTERM)
            if not self._wait_exit(pid, timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                self._wait_exit(pid, 5)
        if self._child is not None:
            self._kill_child()
        self._reap_leftovers()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.run_path)
        return {"dir": self.dir, "stopped": stopped}

    def status(self) -> dict:
        info = self._running_info()
        if info is None:
            return {"dir": self.dir, "running": False}
        return dict(info, running=True)

    def info(self) -> dict:
        info = self._running_info()
        if info is None:
            raise LabError(f"No lab is running in {self.dir}: start it with `python -m lab start`")
        return info

    # Private helpers.

    def _update_config(self, host_address, stock, port, timings) -> dict:
        os.makedirs(self.dir, exist_ok=True)
        config = _read_json(self.config_path, {})
        config.setdefault("username", USERNAME)
        config.setdefault("password", secrets.token_urlsafe(12))
        config.setdefault("host_address", DEFAULT_HOST_ADDRESS)
        config.setdefault("stock", False)
        if host_address is not None:
            config["host_address"] = host_address
        if stock is not None:
            config["stock"] = stock
        if port is not None:
            config["port"] = port
        for name, default in TIMINGS.items():
            config.setdefault(name, default)
            value = timings.get(name)
            if value is None:
                continue
            # A zero wait is a valid choice, a zero poll interval a busy loop.
            least = "> 0" if name == "poll_interval" else ">= 0"
            if value < 0 or (value == 0 and least == "> 0"):
                words = name.replace("_", " ")
                raise LabError(f"Invalid {words} {value}: use seconds {least}")
            config[name] = value
        _write_json(self.config_path, config, 0o600)
        _write_file(self.password_path, config["password"], 0o600)
        return config

    def _wait_started(self, child, config, timeout) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            if child.poll() is not None:
                raise LabError(
                    f"The lab in {self.dir} failed to start (exit status {child.returncode}); "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            info = _read_json(self.run_path, None)
            if info is not None and info.get("pid") == child.pid and _answers(info):
                return info
            if time.monotonic() > deadline:
                raise LabError(
                    f"The lab in {self.dir} did not answer within {timeout:.0f} s; "
                    f"see {self.log_path}"
                )
            time.sleep(0.1)

    def _running_info(self) -> dict | None:
        info = _read_json(self.run_path, None)
        if info is None or not _is_lab_process(info.get("pid"), self.dir):
            return None
        return info

    def _wait_exit(self, pid, timeout) -> bool:
        deadline = time.monotonic() + timeout
        while alive(pid):
            if self._child is not None and self._child.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._child.wait(0.1)
            else:
                time.sleep(0.1)
            if time.monotonic() > deadline:
                return False
        return True

    def _kill_child(self):
        child, self._child = self._child, None
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()

    def _reap_leftovers(self):
        # The host keeps a pid file for each process it runs; a host object
        # on the same directory stops whatever a dead lab left there.
        config = _read_json(self.config_path, None)
        if config is None:
            return
        from lab.host import Host
        from lab.pki import Pki

        Host(self.dir, Pki(os.path.join(self.dir, "pki")), config["host_address"]).stop()


class Hooks:
    """Client of the lab's test hooks (``/lab/...`` on the engine port)."""

    def __init__(self, url: str, ca_file: str, timeout: float = 120.0):
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname
        self.port = parts.port
        self.prefix = parts.path.rstrip("/")
        self.context = ssl.create_default_context(cafile=ca_file)
        self.timeout = timeout

    def request(self, method: str, path: str, body=None, **query):
        """Call a hook; the decoded JSON reply, or LabError for an error status."""
        target = self.prefix + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        con = http.client.HTTPSConnection(
            self.host, self.port, context=self.context, timeout=self.timeout
        )
        try:
            con.request(method, target, body=data, headers={"Content-Type": "application/json"})
            reply = con.getresponse()
            payload = json.loads(reply.read() or b"null")
        finally:
            con.close()
        if reply.status != 200:
            raise LabError(f"{method} {target} failed: HTTP {reply.status}: {payload}")
        return payload

    def info(self) -> dict:
        return self.request("GET", "/info")

    def state(self) -> dict:
        return self.request("GET", "/state")

    def settled(self, timeout: float = 30.0) -> dict:
        """The lab state once no transfer, ticket, NBD server or job is left
        running; LabError if that does not happen within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            busy = [
                key
                for key in ("open_transfers", "tickets", "nbd_servers", "started_jobs")
                if state[key]
            ]
            if not busy:
                return state
            if time.monotonic() > deadline:
                raise LabError(f"The lab is still busy after {timeout:.0f} s: {busy}: {state}")
            time.sleep(0.1)

    def history(self, entity: str | None = None, since: int = 0) -> list[dict]:
        query = {"since": since}
        if entity is not None:
            query["entity"] = entity
        return self.request("GET", "/history", **query)["history"]

    def states(self, entity: str) -> list[str]:
        """The states entity went through, oldest first."""
        return [h["state"] for h in self.history(entity)]

    def volume(self, disk_id: str) -> dict:
        return self.request("GET", f"/disks/{disk_id}/volume")

    def checksum(self, disk_id: str, **query) -> dict:
        return self.request("GET", f"/disks/{disk_id}/checksum", **query)

    def fail(
        self,
        path: str,
        status: int | None = None,
        method: str = "*",
        count: int = 1,
        detail: str | None = None,
        delay: float = 0,
        after: bool = False,
    ) -> dict:
        """Make the next count calls matching method and path pattern wait
        delay seconds and fail with status; with after, each call is carried
        out first and only its answer is the failure."""
        spec = {"method": method, "path": path, "count": count, "delay": delay, "after": after}
        if status is not None:
            spec["status"] = status
        if detail is not None:
            spec["detail"] = detail
        return self.request("POST", "/faults", spec)

    def faults(self) -> list[dict]:
        return self.request("GET", "/faults")["faults"]

    def clear_faults(self) -> None:
        self.request("DELETE", "/faults")

    def imageio(self, verb: str) -> None:
        """restart, stop or start the host's imageio daemon."""
        self.request("POST", f"/host/imageio/{verb}")

    def slow_storage(self, delay_ms: int) -> None:
        self.request("PUT", "/host/slow-storage", {"delay_ms": delay_ms})

    def guest_write(self, vm_id: str, disk_id: str, offset: int, length: int, pattern: int):
        """Write length bytes of pattern at offset through the running VM's device."""
        body = {"disk": disk_id, "offset": offset, "length": length, "pattern": pattern}
        return self.request("POST", f"/vms/{vm_id}/guest-write", body)

    def vm_checksum(self, vm_id: str, disk_id: str, **query) -> dict:
        """imageio's checksum of what the running VM sees of the disk."""
        return self.request("GET", f"/vms/{vm_id}/disks/{disk_id}/checksum", **query)

    def console(self, vm_id: str) -> str:
        return self.request("GET", f"/vms/{vm_id}/console")["console"]

    def wait_console(self, vm_id: str, text: str, timeout: float = 60.0) -> str:
        """The VM's console once it shows text; LabError after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            console = self.console(vm_id)
            if text in console:
                return console
            if time.monotonic() > deadline:
                raise LabError(
                    f"VM {vm_id} did not print {text!r} within {timeout:.0f} s; console:\n{console}"
                )
            time.sleep(0.2)

    def stock(self, value: bool | None = None) -> bool:
        """The stock switch; set it when value is given."""
        if value is None:
            return self.request("GET", "/stock")["stock"]
        return self.request("PUT", "/stock", {"stock": value})["stock"]


def serve(directory: str) -> None:
    """The lab process: start the host and the engine, run until SIGTERM."""
    from lab.engine import Engine, Settings
    from lab.host import Host
    from lab.pki import Pki

    lab = Lab(directory)
    config = _read_json(lab.config_path, None)
    if config is None:
        raise LabError(f"{lab.config_path} is missing: start the lab with `python -m lab start`")
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s [%(name)s] (%(threadName)s) %(message)s",
        stream=sys.stderr,
    )
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())

    pki = Pki(os.path.join(lab.dir, "pki"))
    host = Host(lab.dir, pki, config["host_address"])
    host.start()
    engine = None
    try:
        settings = Settings(
            **{name: float(config.get(name, default)) for name, default in TIMINGS.items()},
        )
        engine = Engine(
            lab.dir,
            host,
            pki,
            config["username"],
            config["password"],
            settings=settings,
            address=ENGINE_ADDRESS,
            port=_usable_port(config.get("port")),
        )
        engine.stock = bool(config["stock"])
        config["port"] = engine.port
        _write_json(lab.config_path, config, 0o600)
        engine.start()
        info = dict(
            engine.info(),
            password=config["password"],
            password_file=lab.password_path,
            dir=lab.dir,
            pid=os.getpid(),
            log=lab.log_path,
        )
        _write_json(lab.run_path, info, 0o600)
        done.wait()
    finally:
        logging.getLogger("lab").info("Stopping the lab")
        if engine is not None:
            engine.stop()
        host.stop()
        info = _read_json(lab.run_path, {})
        if info.get("pid") == os.getpid():
            os.unlink(lab.run_path)


def _usable_port(port) -> int:
    """The port used before if it is still free, else any free port (0)."""
    if not isinstance(port, int) or port <= 0:
        return 0
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ENGINE_ADDRESS, port))
        except OSError:
            return 0
    return port


def _answers(info) -> bool:
    url = info["engine_url"].replace("/api", "/services/health")
    context = ssl.create_default_context(cafile=info["ca_file"])
    # The engine is local: never go through a proxy from the environment.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def _is_lab_process(pid, directory) -> bool:
    """True if pid is alive and is the lab process serving directory."""
    if not isinstance(pid, int) or not alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"serve" in argv and os.fsencode(directory) in argv


def _tail(path, lines=30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        return f"(cannot read: {e})"
    return "\n".join(text.splitlines()[-lines:])


def _read_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _write_json(path, data, mode) -> None:
    _write_file(path, json.dumps(data, indent=1, sort_keys=True) + "\n", mode)


def _write_file(path, text, mode) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
