# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""VMs: AddVm, UpdateVm, RemoveVm, RunVm, StopVm, ShutdownVm, RebootVm, and
the monitor that follows running VMs as the engine follows vdsm's reports.

Statuses as the engine and vdsm set them (OVIRT-FACTS §2.7): ``down`` →
``wait_for_launch`` (the engine, at once) → ``powering_up`` (the qemu process
runs) → ``up`` once the guest agent answers or ``guest_wait_timeout`` seconds
after the start (vdsm's ``GUEST_WAIT_TIMEOUT``, 60 s). An I/O error pauses the
VM (``paused``); ``start`` resumes it. ``shutdown`` presses the ACPI power
button (``powering_down``; a guest that ignores it goes back to ``up``),
``stop`` powers off at once. A VM whose process dies is ``down``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid

from lab.engine import errors, search, xml
from lab.host import HostError, VmDisk

log = logging.getLogger("engine.vms")

DOWN = "down"
WAIT_FOR_LAUNCH = "wait_for_launch"
POWERING_UP = "powering_up"
UP = "up"
PAUSED = "paused"
POWERING_DOWN = "powering_down"
RUNNING = (WAIT_FOR_LAUNCH, POWERING_UP, UP, PAUSED, POWERING_DOWN)
# What the monitor follows: a VM still being launched is not looked at yet.
FOLLOWED = (POWERING_UP, UP, PAUSED, POWERING_DOWN)

# The Blank template every engine has (its id is fixed), and what a VM made
# from it gets when the request leaves a field out.
BLANK_ID = "00000000-0000-0000-0000-000000000000"
BLANK = {
    "id": BLANK_ID,
    "name": "Blank",
    "description": "Blank template",
    "memory": 1024**3,
    "sockets": 1,
    "cores": 1,
    "threads": 1,
    "os_type": "other",
    "type": "server",
}
# VmCommon: max memory is 4 times the memory when not given.
MAX_MEMORY_FACTOR = 4
NAME = re.compile(r"^[\w.-]+$", re.ASCII)
# MaxVmNameLength.
MAX_NAME_LENGTH = 64
VM_TYPES = ("desktop", "server", "high_performance")
INTERFACES = ("ide", "virtio_scsi", "virtio", "spapr_vscsi", "sata")
# What the engine hot-plugs for the OS type "other".
HOTPLUG_INTERFACES = ("virtio", "virtio_scsi")
# VMStatus display names, as validation messages spell them.
DISPLAY_NAMES = {
    WAIT_FOR_LAUNCH: "Wait for Launch",
    POWERING_UP: "Powering Up",
    UP: "Up",
    PAUSED: "Paused",
    POWERING_DOWN: "Powering Down",
}


class Vms:
    def __init__(self, engine):
        self.engine = engine
        self.db = engine.db
        # VM id -> (monotonic deadline, status before) of a shutdown in progress.
        self._shutdowns: dict[str, tuple[float, str]] = {}

    # VMs.

    def add(self, node: xml.Node, correlation_id: str | None) -> dict:
        missing = []
        if not _ref_given(node, "cluster"):
            missing.append("cluster.id|name")
        if not node.text("name"):
            missing.append("name")
        if not _ref_given(node, "template"):
            missing.append("template.id|name")
        if missing:
            raise errors.incomplete("Vm", missing, "add")
        cluster = self._cluster(node.child("cluster"))
        template = _template(node.child("template"))
        name = node.text("name")
        with self.db.transaction():
            self._check_name(name, errors.ACTION_ADD)
            memory = node.integer("memory") or template["memory"]
            topology = node.child("cpu/topology")
            vm = {
                "id": str(uuid.uuid4()),
                "name": name,
                "description": node.text("description") or "",
                "comment": node.text("comment") or "",
                "cluster_id": cluster["id"],
                "template_id": template["id"],
                "memory": memory,
                "memory_guaranteed": node.integer("memory_policy/guaranteed") or memory,
                "memory_max": node.integer("memory_policy/max") or memory * MAX_MEMORY_FACTOR,
                "sockets": _count(topology, "sockets", template),
                "cores": _count(topology, "cores", template),
                "threads": _count(topology, "threads", template),
                "os_type": node.text("os/type") or template["os_type"],
                "type": node.enum("type", VM_TYPES, "VmType") or template["type"],
                "status": DOWN,
                "host_id": None,
                "start_time": None,
                "stop_time": None,
                "created": time.time(),
            }
            self._check_memory(vm, errors.ACTION_ADD)
            self.db.insert("vms", vm)
            self.db.record("vm", vm["id"], DOWN)
            job_id = self.engine.jobs.start(
                f"Creating VM {name} in Cluster {cluster['name']}", correlation_id
            )
        self.engine.jobs.end(job_id, succeeded=True)
        log.info("Added VM %s (%s)", name, vm["id"])
        return vm

    def get(self, vm_id: str) -> dict:
        vm = self.db.get("vms", vm_id)
        if vm is None:
            raise errors.not_found()
        return vm

    def list(self, query: str | None, case_sensitive: bool, limit: int | None) -> list[dict]:
        vms = self.db.all("SELECT * FROM vms ORDER BY created")
        return search.select(vms, query, self._fields(), "vms", case_sensitive, limit)

    def update(self, vm_id: str, node: xml.Node, correlation_id: str | None) -> dict:
        with self.db.transaction():
            vm = self.get(vm_id)
            changes = {}
            name = node.text("name")
            if name and name != vm["name"]:
                if vm["status"] != DOWN:
                    raise errors.vm_validation(errors.ACTION_EDIT, "VM is running.")
                self._check_name(name, errors.ACTION_EDIT)
                changes["name"] = name
            for field in ("description", "comment"):
                value = node.text(field)
                if value is not None:
                    changes[field] = value
            for field, path in (
                ("memory", "memory"),
                ("memory_guaranteed", "memory_policy/guaranteed"),
                ("memory_max", "memory_policy/max"),
                ("sockets", "cpu/topology/sockets"),
                ("cores", "cpu/topology/cores"),
                ("threads", "cpu/topology/threads"),
            ):
                value = node.integer(path)
                if value is not None and value != vm[field]:
                    changes[field] = value
            os_type = node.text("os/type")
            if os_type:
                changes["os_type"] = os_type
            vm_type = node.enum("type", VM_TYPES, "VmType")
            if vm_type:
                changes["type"] = vm_type
            self._check_memory(dict(vm, **changes), errors.ACTION_EDIT)
            job_id = self.engine.jobs.start(f"Editing VM {vm['name']} properties", correlation_id)
            if changes:
                self.db.update("vms", vm_id, **changes)
            vm = self.get(vm_id)
        self.engine.jobs.end(job_id, succeeded=True)
        return vm

    def remove(self, vm_id: str, detach_only: bool, correlation_id: str | None) -> str:
        with self.db.transaction():
            vm = self.get(vm_id)
            if vm["status"] != DOWN:
                raise errors.vm_validation(errors.ACTION_REMOVE, "VM is running.")
            attachments = self.attachments(vm_id)
            disks = [self.engine.disks.get(a["disk_id"]) for a in attachments]
            locked = [d["alias"] for d in disks if d["status"] == "locked"]
            if locked and not detach_only:
                raise errors.vm_disks_locked(errors.ACTION_REMOVE, ", ".join(locked))
            job_id = self.engine.jobs.start(f"Removing VM {vm['name']} from system", correlation_id)
            self.db.run("DELETE FROM disk_attachments WHERE vm_id = ?", (vm_id,))
            self.db.delete("vms", vm_id)
            self.db.record("vm", vm_id, "removed")
        failed = False
        if not detach_only:
            for disk in disks:
                try:
                    self.engine.disks.destroy(disk)
                except Exception:
                    log.exception("Removing disk %s of VM %s failed", disk["id"], vm["name"])
                    failed = True
        self.engine.jobs.end(job_id, succeeded=not failed)
        log.info("Removed VM %s (%s)", vm["name"], vm_id)
        return job_id

    # Actions.

    def start(self, vm_id: str, correlation_id: str | None) -> str:
        with self.db.transaction():
            vm = self.get(vm_id)
            if vm["status"] == PAUSED:
                return self._resume(vm, correlation_id)
            if vm["status"] != DOWN:
                raise errors.validation(
                    errors.CONFLICT,
                    f"Cannot run VM because the VM is in {_display(vm['status'])} status.",
                )
            disks = self._plugged_disks(vm_id)
            locked = [d["alias"] for d, _ in disks if d["status"] != "ok"]
            if locked:
                raise errors.vm_disks_locked(errors.ACTION_RUN, ", ".join(locked))
            job_id = self.engine.jobs.start(f"Launching VM {vm['name']}", correlation_id)
            self._set_status(vm_id, WAIT_FOR_LAUNCH, host_id=self.engine.host.id)
        threading.Thread(
            target=self._launch, args=(vm, disks, job_id), name=f"run-{vm['name']}", daemon=True
        ).start()
        return job_id

    def stop(self, vm_id: str, correlation_id: str | None) -> str:
        with self.db.transaction():
            vm = self.get(vm_id)
            job_id = self.engine.jobs.start(f"Stopping VM {vm['name']}", correlation_id)
            if vm["status"] == DOWN:
                # StopVm skips a VM that is already down, and succeeds.
                self.engine.jobs.end(job_id, succeeded=True)
                return job_id
        self.engine.host.destroy_vm(vm_id)
        self._set_down(vm_id)
        self.engine.jobs.end(job_id, succeeded=True)
        return job_id

    def shutdown(self, vm_id: str, correlation_id: str | None) -> str:
        with self.db.transaction():
            vm = self.get(vm_id)
            job_id = self.engine.jobs.start(f"Shutting down VM {vm['name']}", correlation_id)
            if vm["status"] == DOWN:
                self.engine.jobs.end(job_id, succeeded=True)
                return job_id
            running = self.engine.host.vm(vm_id)
            # Nothing in the guest can take the button then: power off.
            power_off = vm["status"] in (WAIT_FOR_LAUNCH, PAUSED) or running is None
            if not power_off:
                # Known to the monitor before it sees powering_down.
                deadline = time.monotonic() + self.engine.settings.shutdown_timeout
                self._shutdowns[vm_id] = (deadline, vm["status"])
                self._set_status(vm_id, POWERING_DOWN)
        if power_off:
            self.engine.host.destroy_vm(vm_id)
            self._set_down(vm_id)
        else:
            try:
                running.powerdown()
            except HostError as e:
                log.warning("Shutdown of VM %s failed: %s", vm["name"], e)
        self.engine.jobs.end(job_id, succeeded=True)
        return job_id

    def reboot(self, vm_id: str, correlation_id: str | None) -> str:
        with self.db.transaction():
            vm = self.get(vm_id)
            if vm["status"] not in (UP, POWERING_UP):
                raise errors.vm_validation(errors.ACTION_REBOOT, "VM is not running.")
            job_id = self.engine.jobs.start(f"Rebooting VM {vm['name']}", correlation_id)
        succeeded = True
        try:
            self._running(vm).reset()
        except HostError as e:
            log.warning("Reboot of VM %s failed: %s", vm["name"], e)
            succeeded = False
        self.engine.jobs.end(job_id, succeeded=succeeded)
        return job_id

    # Disk attachments.

    def attachments(self, vm_id: str) -> list[dict]:
        return self.db.all(
            "SELECT * FROM disk_attachments WHERE vm_id = ? ORDER BY created", (vm_id,)
        )

    def attachment(self, vm_id: str, disk_id: str) -> dict:
        self.get(vm_id)
        found = self.db.one(
            "SELECT * FROM disk_attachments WHERE vm_id = ? AND disk_id = ?", (vm_id, disk_id)
        )
        if found is None:
            raise errors.not_found()
        return found

    def attachment_of_disk(self, disk_id: str) -> dict | None:
        return self.db.one("SELECT * FROM disk_attachments WHERE disk_id = ?", (disk_id,))

    def attach(self, vm_id: str, node: xml.Node, correlation_id: str | None) -> dict:
        """Attach an existing disk (given by id), or create the disk inline.

        As the engine does: an existing disk is plugged only when ``active``
        is true; a disk made inline is plugged unless ``active`` is false,
        once its volume exists. Attaching makes no job.
        """
        vm = self.get(vm_id)
        interface = node.enum("interface", INTERFACES, "DiskInterface")
        if interface is None:
            raise errors.validation(errors.BAD_REQUEST, "Interface is required")
        disk_node = node.child("disk")
        if disk_node is None:
            raise errors.incomplete("DiskAttachment", ["disk.id"], "add")
        bootable = bool(node.boolean("bootable"))
        read_only = bool(node.boolean("read_only") or disk_node.boolean("read_only"))
        existing = disk_node.id is not None and self.db.get("disks", disk_node.id) is not None
        with self.db.transaction():
            if existing:
                disk = self.engine.disks.get(disk_node.id)
                attached = self.attachment_of_disk(disk["id"])
                if attached is not None and attached["vm_id"] == vm_id:
                    raise errors.attach_refused("The disk is already attached to VM.")
                if attached is not None:
                    raise errors.attach_refused(
                        "The disk is not shareable and is already attached to a VM."
                    )
                if disk["status"] == "locked":
                    raise errors.disks_locked(errors.ACTION_ATTACH, disk["alias"])
                active = bool(node.boolean("active"))
            elif disk_node.id is not None and not disk_node.has("provisioned_size"):
                raise errors.disk_not_exist(errors.ACTION_ATTACH)
            else:
                active = node.boolean("active") is not False
            if bootable:
                self._check_one_bootable(vm, errors.ACTION_ATTACH if existing else "add")
            if active and interface not in HOTPLUG_INTERFACES and vm["status"] != DOWN:
                raise errors.ide_hotplug(vm["name"])
            if not existing:
                disk = self.engine.disks.add(disk_node, correlation_id)
            attachment = {
                "vm_id": vm_id,
                "disk_id": disk["id"],
                "interface": interface,
                "bootable": int(bootable),
                "active": int(active),
                "read_only": int(read_only),
                "pass_discard": int(bool(node.boolean("pass_discard"))),
                "created": time.time(),
            }
            self.db.insert("disk_attachments", attachment)
        if active and vm["status"] in RUNNING:
            if existing:
                try:
                    self._hotplug(vm, disk, attachment)
                except HostError as e:
                    self.db.run("DELETE FROM disk_attachments WHERE disk_id = ?", (disk["id"],))
                    raise errors.hotplug_failed(disk["alias"], str(e)) from None
            else:
                threading.Thread(
                    target=self._plug_when_ready, args=(vm, disk["id"]), daemon=True
                ).start()
        return attachment

    def update_attachment(self, vm_id: str, disk_id: str, node: xml.Node) -> dict:
        attachment = self.attachment(vm_id, disk_id)
        vm = self.get(vm_id)
        disk = self.engine.disks.get(disk_id)
        changes = {}
        interface = node.enum("interface", INTERFACES, "DiskInterface")
        if interface and interface != attachment["interface"]:
            if vm["status"] != DOWN and attachment["active"]:
                raise errors.vm_validation(errors.ACTION_EDIT, "VM is running.")
            changes["interface"] = interface
        bootable = node.boolean("bootable")
        if bootable is not None and bootable != bool(attachment["bootable"]):
            if bootable:
                self._check_one_bootable(vm, errors.ACTION_EDIT)
            changes["bootable"] = int(bootable)
        read_only = node.boolean("read_only")
        if read_only is not None:
            changes["read_only"] = int(read_only)
        active = node.boolean("active")
        if active is not None and active != bool(attachment["active"]):
            if vm["status"] in RUNNING and active and attachment["interface"] == "ide":
                raise errors.ide_hotplug(vm["name"])
            if vm["status"] in RUNNING:
                try:
                    if active:
                        self._hotplug(vm, disk, dict(attachment, **changes))
                    else:
                        self._running(vm).unplug(disk_id)
                except HostError as e:
                    raise errors.hotplug_failed(disk["alias"], str(e)) from None
            changes["active"] = int(active)
        if changes:
            with self.db.transaction():
                self.db.run(
                    "UPDATE disk_attachments SET "
                    + ", ".join(f"{k} = ?" for k in changes)
                    + " WHERE disk_id = ?",
                    (*changes.values(), disk_id),
                )
        return self.attachment(vm_id, disk_id)

    def detach(self, vm_id: str, disk_id: str, detach_only: bool, correlation_id: str | None):
        attachment = self.attachment(vm_id, disk_id)
        vm = self.get(vm_id)
        disk = self.engine.disks.get(disk_id)
        if vm["status"] in RUNNING and attachment["active"]:
            raise errors.disk_is_plugged(disk["alias"])
        if not detach_only and disk["status"] == "locked":
            raise errors.object_locked(errors.ACTION_REMOVE)
        with self.db.transaction():
            self.db.run("DELETE FROM disk_attachments WHERE disk_id = ?", (disk_id,))
        if not detach_only:
            self.engine.disks.remove(disk_id, correlation_id)

    def plugged(self, disk_id: str) -> dict | None:
        """The running VM a disk is plugged into, or None."""
        attachment = self.attachment_of_disk(disk_id)
        if attachment is None or not attachment["active"]:
            return None
        vm = self.db.get("vms", attachment["vm_id"])
        return vm if vm is not None and vm["status"] in RUNNING else None

    # Monitoring.

    def poll(self) -> None:
        """Follow every running VM, as the engine follows vdsm's reports."""
        marks = ", ".join("?" for _ in FOLLOWED)
        for vm in self.db.all(f"SELECT * FROM vms WHERE status IN ({marks})", FOLLOWED):
            try:
                self._follow(vm)
            except Exception:
                log.exception("Following VM %s failed", vm["name"])

    def recover(self) -> None:
        """At start-up: take over the VMs whose qemu still runs, as a
        restarted engine finds them on its hosts; the others are down."""
        host = self.engine.host
        for vm in self.db.all("SELECT * FROM vms WHERE status != ?", (DOWN,)):
            adopted = None
            if vm["status"] != WAIT_FOR_LAUNCH:
                try:
                    adopted = host.adopt_vm(**self._host_vm(vm, self._plugged_disks(vm["id"])))
                except HostError as e:
                    log.warning("Cannot take over VM %s: %s", vm["name"], e)
            if adopted is None:
                self._set_down(vm["id"])
            else:
                log.info("VM %s still runs (pid %s)", vm["name"], adopted.pid)
        host.reap_vms()

    # XML.

    def render(self, vm: dict):
        return xml.vm(vm, self.engine.inventory.cluster(vm["cluster_id"]))

    def render_attachment(self, attachment: dict):
        return xml.disk_attachment(attachment)

    # Private helpers.

    def _launch(self, vm: dict, disks: list, job_id: str) -> None:
        try:
            self.engine.host.start_vm(**self._host_vm(vm, disks))
        except Exception as e:
            log.error("Failed to run VM %s: %s", vm["name"], e)
            self._set_down(vm["id"])
            self.engine.jobs.end(job_id, succeeded=False)
            return
        with self.db.transaction():
            self._set_status(vm["id"], POWERING_UP, start_time=time.time(), stop_time=None)
        self.engine.jobs.end(job_id, succeeded=True)
        log.info("VM %s is powering up", vm["name"])

    def _resume(self, vm: dict, correlation_id: str | None) -> str:
        job_id = self.engine.jobs.start(f"Launching VM {vm['name']}", correlation_id)
        try:
            self._running(vm).resume()
        except HostError as e:
            self.engine.jobs.end(job_id, succeeded=False)
            raise errors.vm_validation(errors.ACTION_RUN, f"Resuming failed: {e}") from None
        self._set_status(vm["id"], UP)
        self.engine.jobs.end(job_id, succeeded=True)
        return job_id

    def _follow(self, vm: dict) -> None:
        running = self.engine.host.vm(vm["id"])
        state = running.status() if running is not None else "down"
        if state == "down":
            self.engine.host.destroy_vm(vm["id"])
            self._set_down(vm["id"])
            log.info("VM %s is down", vm["name"])
            self._shutdowns.pop(vm["id"], None)
            return
        if state == "paused":
            self._set_status(vm["id"], PAUSED)
            return
        status = vm["status"]
        if status == PAUSED:
            self._set_status(vm["id"], UP)
        elif status == POWERING_UP:
            waited = time.time() - (vm["start_time"] or time.time())
            if waited >= self.engine.settings.guest_wait_timeout or (running.guest_agent_answers()):
                self._set_status(vm["id"], UP)
        elif status == POWERING_DOWN:
            deadline, before = self._shutdowns.get(vm["id"], (0, UP))
            if time.monotonic() > deadline:
                # The guest ignored the button: it runs on, as on oVirt.
                self._shutdowns.pop(vm["id"], None)
                self._set_status(vm["id"], before)

    def _host_vm(self, vm: dict, disks: list[tuple[dict, dict]]) -> dict:
        """What the host runs a VM from: its record and its plugged disks."""
        return {
            "vm_id": vm["id"],
            "name": vm["name"],
            "memory": vm["memory"],
            "sockets": vm["sockets"],
            "cores": vm["cores"],
            "threads": vm["threads"],
            "disks": [self._vm_disk(disk, attachment) for disk, attachment in disks],
        }

    def _plugged_disks(self, vm_id: str) -> list[tuple[dict, dict]]:
        return [
            (self.engine.disks.get(a["disk_id"]), a) for a in self.attachments(vm_id) if a["active"]
        ]

    def _vm_disk(self, disk: dict, attachment: dict) -> VmDisk:
        volume = self.engine.disks.volume(disk)
        if volume is None:
            raise HostError(f"Disk {disk['alias']} has no volume")
        return VmDisk(
            disk["id"],
            volume.qemu_node(direct=True),
            attachment["interface"],
            bootable=bool(attachment["bootable"]),
            read_only=bool(attachment["read_only"]),
            reads=volume.backing,
        )

    def _hotplug(self, vm: dict, disk: dict, attachment: dict) -> None:
        if disk["status"] != "ok":
            raise HostError(f"Disk {disk['alias']} is {disk['status']}")
        self._running(vm).hotplug(self._vm_disk(disk, attachment))

    def _plug_when_ready(self, vm: dict, disk_id: str) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            disk = self.db.get("disks", disk_id)
            attachment = self.attachment_of_disk(disk_id)
            if disk is None or attachment is None:
                return
            if disk["status"] == "ok":
                try:
                    self._hotplug(vm, disk, attachment)
                except HostError as e:
                    log.error("Plugging disk %s into VM %s failed: %s", disk_id, vm["name"], e)
                    self.db.run(
                        "UPDATE disk_attachments SET active = 0 WHERE disk_id = ?", (disk_id,)
                    )
                return
            time.sleep(0.1)

    def _running(self, vm: dict):
        running = self.engine.host.vm(vm["id"])
        if running is None:
            raise HostError(f"VM {vm['name']} is not running on the host")
        return running

    def _set_status(self, vm_id: str, status: str, **fields) -> None:
        with self.db.transaction():
            current = self.db.get("vms", vm_id)
            if current is None:
                return
            self.db.update("vms", vm_id, status=status, **fields)
            if current["status"] != status:
                self.db.record("vm", vm_id, status)

    def _set_down(self, vm_id: str) -> None:
        self._set_status(vm_id, DOWN, host_id=None, stop_time=time.time())

    def _check_name(self, name: str, action: str) -> None:
        if len(name) > MAX_NAME_LENGTH:
            raise errors.vm_validation(
                action, "The given name is too long.", status=errors.BAD_REQUEST
            )
        if not NAME.match(name):
            raise errors.validation(
                errors.BAD_REQUEST,
                f"Can not {action} {errors.TYPE_VM}. The given name contains special "
                "characters. Only lower-case and upper-case letters, numbers, '_', '-', '.' "
                "are allowed.",
            )
        if self.db.one("SELECT id FROM vms WHERE name = ?", (name,)) is not None:
            raise errors.vm_name_in_use(action)

    def _check_memory(self, vm: dict, action: str) -> None:
        if vm["memory"] <= 0 or vm["memory_guaranteed"] > vm["memory"]:
            raise errors.vm_validation(
                action, "Physical Memory Guaranteed cannot exceed Memory Size."
            )
        if vm["memory_max"] < vm["memory"]:
            raise errors.vm_validation(
                action, "Maximum memory size must not be lower than the memory size."
            )

    def _check_one_bootable(self, vm: dict, action: str) -> None:
        for attachment in self.attachments(vm["id"]):
            if attachment["bootable"]:
                alias = self.engine.disks.get(attachment["disk_id"])["alias"]
                raise errors.validation(
                    errors.CONFLICT,
                    f"Cannot {action} {errors.TYPE_DISK}. Disk {alias} in VM {vm['name']} is "
                    "already marked as boot.",
                )

    def _cluster(self, node: xml.Node) -> dict:
        if node.id:
            cluster = self.db.get("clusters", node.id)
            if cluster is None:
                raise errors.entity_not_found(f"Cluster: id={node.id}")
            return cluster
        name = node.text("name")
        for cluster in self.engine.inventory.clusters():
            if cluster["name"] == name:
                return cluster
        raise errors.entity_not_found(f"Cluster: name={name}")

    def _fields(self) -> dict:
        return {
            "id": search.Field(lambda v: v["id"]),
            "name": search.Field(lambda v: v["name"]),
            "description": search.Field(lambda v: v["description"]),
            "comment": search.Field(lambda v: v["comment"]),
            "status": search.Field(lambda v: v["status"], enum=True),
            "cluster": search.Field(
                lambda v: self.engine.inventory.cluster(v["cluster_id"])["name"]
            ),
        }


def templates() -> list[dict]:
    return [BLANK]


def template_fields(data_centers: list[str]) -> dict:
    # Blank belongs to every data center.
    return {
        "id": search.Field(lambda t: t["id"]),
        "name": search.Field(lambda t: t["name"]),
        "description": search.Field(lambda t: t["description"]),
        "datacenter": search.Field(lambda t: data_centers),
    }


def _template(node: xml.Node) -> dict:
    if (node.id or BLANK_ID) != BLANK_ID or (node.text("name") or "Blank") != "Blank":
        raise errors.entity_not_found("GetVmTemplate")
    return BLANK


def _display(status: str) -> str:
    return DISPLAY_NAMES.get(status, status.replace("_", " ").title())


def _ref_given(node: xml.Node, name: str) -> bool:
    child = node.child(name)
    return child is not None and bool(child.id or child.text("name"))


def _count(topology: xml.Node | None, name: str, template: dict) -> int:
    value = topology.integer(name) if topology is not None else None
    if value is None:
        return template[name]
    if value < 1:
        raise errors.bad_request(f"Invalid CPU {name} {value}: use a positive number")
    return value
