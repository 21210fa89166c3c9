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

import hashlib
import ipaddress
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid

from lab import storage
from lab.host.errors import HostError, TicketError
from lab.host.imageio import REMOVE_TIMEOUT, Daemon
from lab.host.nbd import NBD_ID_MAX, NbdServer, check_nbd_id, nbd_id
from lab.host.process import Process, list_dir, unlink
from lab.host.vms import QmpLoop, Vm, VmDisk, VmError

__all__ = ["Host", "HostError", "TicketError", "VmDisk", "VmError"]

log = logging.getLogger("lab.host")

# Linux limit for a unix socket path (sun_path), including the final NUL.
UNIX_PATH_MAX = 108


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
        self.vm_dir = os.path.join(self.run_dir, "vms")
        self.pid_dir = os.path.join(self.run_dir, "pids", self.name)
        self.id = self._load_id(id)

        self._lock = threading.RLock()
        # Tickets as last added or extended, so a restarted daemon gets them
        # back; keyed by uuid.
        self._tickets: dict[str, dict] = {}
        self._nbd: dict[str, NbdServer] = {}
        self._slow_ms = 0
        self._vms: dict[str, Vm] = {}
        self.qmp_loop = QmpLoop()
        # TCG unless told otherwise: KVM here may hang a stock kernel.
        self.accel = "tcg"
        self._daemon = Daemon(
            label=f"imageio daemon of {self.name}",
            key=f"imageio-{self.name}",
            host=self,
            address=self.address,
            local=True,
        )
        self._proxy = Daemon(
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
                self._reap_stale(keep_vms=True)
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
        check_nbd_id(server_id)
        with self._lock:
            if server_id in self._nbd:
                raise HostError(
                    f"NBD server {server_id} is already running: stop it before starting "
                    f"another one for the same id"
                )
            os.makedirs(self.nbd_dir, exist_ok=True)
            os.makedirs(self.pid_dir, exist_ok=True)
            server = NbdServer(
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
        server_id = nbd_id(url_or_id)
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

    def start_vm(self, vm_id, name, memory, sockets, cores, threads, disks) -> Vm:
        """Run a VM with disks (VmDisk); its guest runs on return."""
        with self._lock:
            if vm_id in self._vms:
                raise VmError(f"VM {name} is already running on host {self.name}")
            vm = Vm(self, vm_id, name, memory, sockets, cores, threads, disks, self.accel)
            self._vms[vm_id] = vm
        try:
            vm.start()
        except BaseException:
            with self._lock:
                self._vms.pop(vm_id, None)
            raise
        return vm

    def adopt_vm(self, vm_id, name, memory, sockets, cores, threads, disks) -> Vm | None:
        """The VM's qemu an earlier lab process left running, taken over, or
        None when it is gone."""
        vm = Vm(self, vm_id, name, memory, sockets, cores, threads, disks, self.accel)
        if not vm.adopt():
            return None
        with self._lock:
            self._vms[vm_id] = vm
        return vm

    def vm_console_path(self, vm_id) -> str:
        """The file a VM's serial console is written to; it outlives the VM."""
        return os.path.join(self.log_dir, f"vm-{vm_id}.console")

    def vm(self, vm_id) -> Vm | None:
        with self._lock:
            return self._vms.get(vm_id)

    def destroy_vm(self, vm_id) -> bool:
        """Power a VM off at once; False if it was not running here."""
        with self._lock:
            vm = self._vms.pop(vm_id, None)
        if vm is None:
            return False
        vm.kill()
        return True

    def vm_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._vms)

    def reap_vms(self) -> None:
        """Stop VMs an earlier lab process left that nobody adopted."""
        for pid_file in list_dir(self.pid_dir):
            vm_id = pid_file[len("vm-") : -len(".json")]
            if pid_file.startswith("vm-") and pid_file.endswith(".json") and not self.vm(vm_id):
                Process.reap(os.path.join(self.pid_dir, pid_file))

    def processes(self) -> list[int]:
        """Pids of every process this host runs now."""
        with self._lock:
            pids = [d.pid for d in (self._daemon, self._proxy) if d.running()]
            for server in self._nbd.values():
                pids.extend(server.pids())
            pids.extend(vm.pid for vm in self._vms.values() if vm.alive())
            return pids

    # Private helpers.

    def _stop_all(self):
        errors = []
        for vm_id in list(self._vms):
            try:
                self._vms.pop(vm_id).kill()
            except Exception as e:
                errors.append(e)
        self.qmp_loop.stop()
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

    def _reap_stale(self, keep_vms=False):
        # VMs run on when the lab process dies, as they do when an engine or
        # vdsm restarts: a starting host leaves them to the engine to adopt.
        for pid_file in list_dir(self.pid_dir):
            if pid_file.endswith(".json") and not (keep_vms and pid_file.startswith("vm-")):
                Process.reap(os.path.join(self.pid_dir, pid_file))
        for daemon in (self._daemon, self._proxy):
            unlink(daemon.control_socket)

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


def _run_dir(lab_dir, name) -> str:
    """The run directory for sockets: <lab dir>/run unless socket paths
    would be too long there, then a short directory under the temp dir."""
    run_dir = os.path.join(lab_dir, "run")
    longest = os.path.join(run_dir, "nbd", "x" * NBD_ID_MAX + ".qemu.sock")
    if len(longest.encode()) < UNIX_PATH_MAX:
        return run_dir
    digest = hashlib.sha1(f"{lab_dir}\0{name}".encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"lab-run-{digest}")


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
