# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Test hooks under /lab/ on the engine port: outside the oVirt API, JSON in
and out, no authentication (the engine listens on loopback only).

- ``GET /lab/info``: engine URL, credentials file names, domains
- ``GET /lab/state``: disks, open transfers, host tickets, NBD servers,
  processes and started jobs, to check that a failure left nothing behind
- ``GET /lab/history?entity=ID&since=SEQ``: recorded state changes (disk
  statuses, transfer phases, job statuses), oldest first
- ``GET /lab/disks/ID/volume``: the volume behind a disk (path, format, qemu
  filename), ``GET /lab/disks/ID/checksum?algorithm=&block_size=``: the
  imageio checksum of its data
- ``GET|POST|DELETE /lab/faults``: list, add, clear injected failures; a fault
  ``{"method": "POST", "path": "/ovirt-engine/api/disks", "status": 500,
  "count": 1, "detail": "...", "delay": 0}`` makes the next ``count`` calls
  whose method and path match (``*`` wildcards) wait ``delay`` seconds and,
  if ``status`` is given, fail with it
- ``POST /lab/host/imageio/restart|stop|start``: the host's imageio daemon
- ``PUT /lab/host/slow-storage`` ``{"delay_ms": N}``: slow NBD servers
  started from now on
- ``GET|PUT /lab/stock`` ``{"stock": true}``: behave as a released engine
  for fields it ignores (``Disk.external_disk``)
- ``POST /lab/vms/ID/guest-write`` ``{"disk": ID, "offset": N, "length": N,
  "pattern": P}``: write through the running VM's own device, as its guest
  would; ``GET /lab/vms/ID/console``: the serial console; ``GET
  /lab/vms/ID/disks/DISK_ID/checksum``: imageio's checksum of what the VM
  sees of the disk
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import re
import threading
import time

from lab.engine import errors, xml
from lab.engine.api import Reply
from lab.host import HostError
from lab.storage import CHECKSUM_BLOCK_SIZE, StorageError

PREFIX = "/lab"


class Fault:
    def __init__(self, fault_id, method, path, status, count, detail, delay, after=False):
        self.id = fault_id
        self.method = method
        self.path = path
        self.status = status
        self.count = count
        self.detail = detail
        self.delay = delay
        # The call is carried out, and its answer lost: the failure replaces it.
        self.after = after

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method)) and fnmatch.fnmatchcase(path, self.path)

    def info(self) -> dict:
        return {
            "id": self.id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "count": self.count,
            "detail": self.detail,
            "delay": self.delay,
            "after": self.after,
        }


class Faults:
    """Injected failures of engine calls, consumed one call at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._ids = itertools.count(1)

    def add(self, spec: dict) -> Fault:
        method = str(spec.get("method", "*")).upper()
        path = spec.get("path")
        status = spec.get("status")
        count = spec.get("count", 1)
        delay = spec.get("delay", 0)
        if not isinstance(path, str) or not path.startswith("/"):
            raise errors.bad_request(
                "A fault needs 'path', a URL path pattern such as '/ovirt-engine/api/disks*'"
            )
        if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
            raise errors.bad_request(f"Invalid fault status {status!r}: use 400-599")
        if not isinstance(count, int) or count < 1:
            raise errors.bad_request(f"Invalid fault count {count!r}: use a positive integer")
        if not isinstance(delay, (int, float)) or delay < 0:
            raise errors.bad_request(f"Invalid fault delay {delay!r}: use seconds >= 0")
        if status is None and not delay:
            raise errors.bad_request("A fault needs a 'status', a 'delay', or both")
        after = spec.get("after", False)
        if not isinstance(after, bool) or (after and status is None):
            raise errors.bad_request("Invalid fault 'after': use true with a status, or false")
        detail = spec.get("detail") or f"Injected failure of {method} {path}"
        fault = Fault(next(self._ids), method, path, status, count, detail, delay, after)
        with self._lock:
            self._faults.append(fault)
        return fault

    def take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.count -= 1
                    if fault.count == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def list(self) -> list[dict]:
        with self._lock:
            return [f.info() for f in self._faults]


def apply(fault: Fault) -> Reply | None:
    """Run a matched fault: wait, then the failure reply (None to go on normally)."""
    if fault.delay:
        time.sleep(fault.delay)
    if fault.status is None:
        return None
    if fault.status == errors.UNAUTHORIZED:
        return Reply(errors.UNAUTHORIZED)
    body = xml.render(xml.fault(errors.REASON_FAILED, f"[{fault.detail}]"))
    return Reply(fault.status, body, "application/xml")


class Hooks:
    def __init__(self, engine):
        self.engine = engine
        self.routes = [
            ("GET", r"/info", self.info),
            ("GET", r"/state", self.state),
            ("GET", r"/history", self.history),
            ("GET", r"/disks/(?P<id>[^/]+)/volume", self.volume),
            ("GET", r"/disks/(?P<id>[^/]+)/checksum", self.checksum),
            ("GET", r"/faults", self.list_faults),
            ("POST", r"/faults", self.add_fault),
            ("DELETE", r"/faults", self.clear_faults),
            ("POST", r"/host/imageio/(?P<verb>restart|stop|start)", self.imageio),
            ("PUT", r"/host/slow-storage", self.slow_storage),
            ("POST", r"/vms/(?P<id>[^/]+)/guest-write", self.guest_write),
            ("GET", r"/vms/(?P<id>[^/]+)/console", self.console),
            ("GET", r"/vms/(?P<id>[^/]+)/disks/(?P<disk>[^/]+)/checksum", self.vm_checksum),
            ("GET", r"/stock", self.get_stock),
            ("PUT", r"/stock", self.set_stock),
        ]

    def dispatch(self, method: str, path: str, query: dict, body: bytes) -> Reply:
        relative = path[len(PREFIX) :].rstrip("/")
        for route_method, pattern, handler in self.routes:
            match = re.fullmatch(pattern, relative)
            if match is None or route_method != method:
                continue
            try:
                payload = _json_body(body) if method in ("POST", "PUT") else None
                return _json(200, handler(match, query, payload))
            except errors.ApiError as e:
                return _json(e.status, {"error": e.detail or e.reason or str(e.status)})
        return _json(404, {"error": f"No lab hook {method} {path}"})

    # Handlers: (match, query, payload) -> JSON object.

    def info(self, match, query, payload) -> dict:
        return self.engine.info()

    def state(self, match, query, payload) -> dict:
        engine = self.engine
        host = engine.host
        return {
            "disks": engine.db.all("SELECT id, alias, status, storage_domain_id FROM disks"),
            "open_transfers": [t["id"] for t in engine.transfers.open()],
            "tickets": host.tickets(),
            "nbd_servers": host.nbd_servers(),
            "processes": host.processes(),
            "started_jobs": engine.jobs.started_ids(),
            "vms": [
                dict(vm, **self._vm_process(vm["id"]))
                for vm in engine.db.all("SELECT id, name, status FROM vms")
            ],
            "vm_processes": host.vm_ids(),
            "disk_attachments": engine.db.all(
                "SELECT vm_id, disk_id, active FROM disk_attachments"
            ),
        }

    def history(self, match, query, payload) -> dict:
        try:
            since = int(query.get("since", "0"))
        except ValueError:
            raise errors.bad_request("Invalid 'since': expected an integer") from None
        return {"history": self.engine.db.history(query.get("entity"), since)}

    def volume(self, match, query, payload) -> dict:
        volume = self._volume(match.group("id"))
        return {
            "id": volume.id,
            "domain": volume.domain.name,
            "path": volume.path,
            "format": volume.format,
            "capacity": volume.capacity,
            "sparse": volume.sparse,
            "lv_size": volume.lv_size,
            "actual_size": volume.actual_size(),
            "qemu_json": volume.qemu_json(readonly=True),
        }

    def checksum(self, match, query, payload) -> dict:
        volume = self._volume(match.group("id"))
        algorithm, block_size = _checksum_query(query)
        try:
            return volume.checksum(algorithm, block_size)
        except StorageError as e:
            raise errors.bad_request(str(e)) from None

    def list_faults(self, match, query, payload) -> dict:
        return {"faults": self.engine.faults.list()}

    def add_fault(self, match, query, payload) -> dict:
        if not isinstance(payload, dict):
            raise errors.bad_request("Expected a JSON object describing the fault")
        return self.engine.faults.add(payload).info()

    def clear_faults(self, match, query, payload) -> dict:
        self.engine.faults.clear()
        return {"faults": []}

    def imageio(self, match, query, payload) -> dict:
        verb = match.group("verb")
        host = self.engine.host
        # The monitor waits meanwhile: a ticket read failing during the
        # restart would stop the transfer, and the hook is about the data
        # plane, not about the engine losing the host.
        with self.engine.monitor.paused():
            getattr(host, f"{verb}_imageio")()
        return {"imageio": verb}

    def slow_storage(self, match, query, payload) -> dict:
        delay = payload.get("delay_ms") if isinstance(payload, dict) else None
        if not isinstance(delay, int) or isinstance(delay, bool) or delay < 0:
            raise errors.bad_request('Expected {"delay_ms": <milliseconds >= 0>}')
        self.engine.host.slow_storage(delay)
        return {"delay_ms": delay}

    def guest_write(self, match, query, payload) -> dict:
        if not isinstance(payload, dict):
            raise errors.bad_request(
                'Expected {"disk": ID, "offset": N, "length": N, "pattern": P}'
            )
        values = {}
        for key in ("offset", "length", "pattern"):
            value = payload.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise errors.bad_request(f"Invalid {key!r}: expected an integer >= 0")
            values[key] = value
        if values["pattern"] > 0xFF:
            raise errors.bad_request("Invalid 'pattern': expected a byte value 0-255")
        vm = self._running_vm(match.group("id"))
        try:
            vm.guest_write(str(payload.get("disk")), **values)
        except HostError as e:
            raise errors.ApiError(errors.CONFLICT, None, str(e)) from None
        return dict(values, disk=payload.get("disk"))

    def vm_checksum(self, match, query, payload) -> dict:
        vm = self._running_vm(match.group("id"))
        algorithm, block_size = _checksum_query(query)
        try:
            return vm.checksum(match.group("disk"), algorithm, block_size)
        except (HostError, StorageError) as e:
            raise errors.ApiError(errors.CONFLICT, None, str(e)) from None

    def console(self, match, query, payload) -> dict:
        vm_id = match.group("id")
        if self.engine.db.get("vms", vm_id) is None:
            raise errors.ApiError(errors.NOT_FOUND, None, f"No VM {vm_id}")
        path = self.engine.host.vm_console_path(vm_id)
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        return {"console": text}

    def get_stock(self, match, query, payload) -> dict:
        return {"stock": self.engine.stock}

    def set_stock(self, match, query, payload) -> dict:
        stock = payload.get("stock") if isinstance(payload, dict) else None
        if not isinstance(stock, bool):
            raise errors.bad_request('Expected {"stock": true|false}')
        self.engine.stock = stock
        return {"stock": stock}

    # Private helpers.

    def _vm_process(self, vm_id: str) -> dict:
        """The VM's qemu: pid, block jobs, the external images it reads."""
        vm = self.engine.host.vm(vm_id)
        if vm is None:
            return {"pid": None, "block_jobs": [], "reads": []}
        try:
            jobs = vm.block_jobs()
        except HostError:
            jobs = []
        reads = sorted(d.reads for d in vm.disks.values() if d.reads)
        return {"pid": vm.pid, "block_jobs": jobs, "reads": reads}

    def _running_vm(self, vm_id: str):
        if self.engine.db.get("vms", vm_id) is None:
            raise errors.ApiError(errors.NOT_FOUND, None, f"No VM {vm_id}")
        vm = self.engine.host.vm(vm_id)
        if vm is None:
            raise errors.ApiError(errors.CONFLICT, None, f"VM {vm_id} is not running")
        return vm

    def _volume(self, disk_id: str):
        disk = self.engine.db.get("disks", disk_id)
        if disk is None:
            raise errors.ApiError(errors.NOT_FOUND, None, f"No disk {disk_id}")
        volume = self.engine.disks.volume(disk)
        if volume is None:
            raise errors.ApiError(errors.CONFLICT, None, f"Disk {disk_id} has no volume yet")
        return volume


def _checksum_query(query: dict) -> tuple[str, int]:
    try:
        block_size = int(query.get("block_size", CHECKSUM_BLOCK_SIZE))
    except ValueError:
        raise errors.bad_request("Invalid 'block_size': expected bytes") from None
    return query.get("algorithm", "blake2b"), block_size


def _json_body(body: bytes):
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except ValueError as e:
        raise errors.bad_request(f"Invalid JSON body: {e}") from None


def _json(status: int, data) -> Reply:
    return Reply(status, json.dumps(data, indent=1).encode() + b"\n", "application/json")
