# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""VMs through the engine: lookups, creation from a template, disk
attachments, and the start, stop and removal of a VM, each waited on until
the engine reports the status asked for.

Statuses follow oVirt: a started VM is ``wait_for_launch``, then
``powering_up`` while its guest boots, and ``up`` once a guest agent answers
or 60 s have passed (vdsm); live storage migration needs ``up`` or
``paused``. A stopped VM is ``down``.
"""

from __future__ import annotations

import contextlib
import time
import uuid

from ansible_collections.thinair.ovirt.plugins.module_utils._engine import (
    EngineError,
    fault_text,
    sdk,
    types,
)

# A VM in these has a running qemu.
RUNNING = (
    "powering_up",
    "up",
    "paused",
    "powering_down",
    "reboot_in_progress",
    "migrating",
    "wait_for_launch",
)
# Seconds a VM may stay paused after a start before it is resumed again, and
# how many times: a VM that pauses for a minute has storage that fails it.
RESUME_INTERVAL = 5.0
RESUMES = 12
# The statuses a started (or resumed) VM passes through before it runs; the
# engine sets wait_for_launch before its start action returns, so down after
# a start means the VM failed to start.
STARTING = ("wait_for_launch", "paused")


class Vms:
    """The VMs of one engine session (an _engine.Engine)."""

    def __init__(self, engine):
        self.engine = engine
        self.service = engine.system.vms_service()

    def find(self, name):
        """The VM of this name, or None."""
        found = self.engine.call(
            self.service.list, search=f'name="{name}"', what=f"look up VM {name}"
        )
        found = [vm for vm in found if vm.name == name]
        return found[0] if found else None

    def get(self, vm_id):
        """The VM, or None once the engine has removed it."""
        try:
            return self.engine.call(self.service.vm_service(vm_id).get, what=f"look up VM {vm_id}")
        except sdk.NotFoundError:
            return None

    def create(
        self,
        name,
        cluster,
        template="Blank",
        memory=None,
        cpus=None,
        description=None,
        comment=None,
    ):
        """A new VM from a template on a cluster (by name); the engine's
        defaults for what is None. Returns it once it is down."""
        vm = types.Vm(
            name=name,
            cluster=types.Cluster(name=cluster),
            template=types.Template(name=template),
            memory=memory,
            cpu=_topology(cpus),
            description=description,
            comment=comment,
        )
        what = f"create VM {name} on cluster {cluster}"
        try:
            created = self.engine.call(self.service.add, vm, query=_correlation(), what=what,
                                       retry=False)  # fmt: skip
        except sdk.NotFoundError as e:
            # An unknown cluster or template.
            raise EngineError(f"cannot {what}: {fault_text(e)}") from e
        return self.wait(created.id, ("down",), f"create VM {name}")

    def update(self, vm, memory=None, cpus=None, description=None, comment=None):
        """Change the given fields; the VM as the engine reports it after."""
        change = types.Vm(
            memory=memory, cpu=_topology(cpus), description=description, comment=comment
        )
        return self.engine.call(
            self.service.vm_service(vm.id).update, change, what=f"update VM {vm.name}"
        )

    def attachments(self, vm_id):
        service = self.service.vm_service(vm_id).disk_attachments_service()
        return self.engine.call(service.list, what=f"list the disks of VM {vm_id}")

    def attach(self, vm, disk_id, interface="virtio", bootable=False, active=True):
        """Attach an existing disk; a running VM gets it hot-plugged."""
        service = self.service.vm_service(vm.id).disk_attachments_service()
        attachment = types.DiskAttachment(
            disk=types.Disk(id=disk_id),
            interface=types.DiskInterface(interface),
            bootable=bootable,
            active=active,
        )
        return self.engine.call(
            service.add,
            attachment,
            query=_correlation(),
            what=f"attach disk {disk_id} to VM {vm.name}",
        )

    def start(self, vm, wait_for_up=False, timeout=None):
        """Start a VM that is down, or resume a paused one, and wait until it
        runs (powering_up or up), or until it is up with wait_for_up."""
        service = self.service.vm_service(vm.id)
        self.engine.call(
            service.start, query=_correlation(), what=f"start VM {vm.name}", retry=False
        )
        return self.wait_running(vm, wait_for_up, timeout)

    def wait_running(self, vm, wait_for_up=False, timeout=None):
        """Wait until a started VM runs (powering_up or up), or is up. A VM
        that pauses again (its storage failed it once more, say an NBD
        server that is back but not reconnected yet) is resumed again every
        RESUME_INTERVAL seconds."""
        if wait_for_up:
            wanted, passing = ("up",), (*STARTING, "powering_up")
        else:
            wanted, passing = ("powering_up", "up"), STARTING
        service = self.service.vm_service(vm.id)
        paused_since = None
        resumes = 0
        deadline = self.engine.deadline(timeout)
        while True:
            current = self.wait(vm.id, (*wanted, "paused"), f"start VM {vm.name}",
                                deadline.left(), passing=passing)  # fmt: skip
            if status(current) != "paused":
                return current
            now = time.monotonic()
            if paused_since is None:
                paused_since = now
            elif now - paused_since >= RESUME_INTERVAL:
                if resumes == RESUMES:
                    raise EngineError(
                        f"cannot start VM {vm.name}: it paused again after {resumes} resumes; "
                        "its storage fails it (see the engine's events)"
                    )
                self.engine.call(service.start, query=_correlation(),
                                 what=f"resume VM {vm.name}", retry=False)  # fmt: skip
                resumes += 1
                paused_since = None
            deadline.sleep()

    def stop(self, vm, graceful=False, timeout=None):
        """Power the VM off (or shut it down through ACPI) and wait until it is down."""
        service = self.service.vm_service(vm.id)
        action = service.shutdown if graceful else service.stop
        words = "shut down" if graceful else "stop"
        self.engine.call(action, query=_correlation(), what=f"{words} VM {vm.name}", retry=False)
        return self.wait(vm.id, ("down",), f"{words} VM {vm.name}", timeout, passing=RUNNING)

    def remove(self, vm, keep_disks=False, timeout=None):
        """Remove a VM that is down, with its disks unless keep_disks, and
        wait until the engine no longer lists it."""
        service = self.service.vm_service(vm.id)
        with contextlib.suppress(sdk.NotFoundError):
            self.engine.call(
                service.remove,
                detach_only=keep_disks,
                query=_correlation(),
                what=f"remove VM {vm.name}",
                retry=False,
            )
        deadline = self.engine.deadline(timeout)
        while self.get(vm.id) is not None:
            if deadline.expired():
                raise EngineError(f"VM {vm.name} is still there after its removal")
            deadline.sleep()

    def wait(self, vm_id, wanted, what, timeout=None, passing=()):
        """Wait until the VM's status is one of wanted; a status outside wanted
        and passing (the ones it may go through on the way) is an error."""
        deadline = self.engine.deadline(timeout)
        while True:
            vm = self.get(vm_id)
            if vm is None:
                raise EngineError(f"cannot {what}: the engine removed VM {vm_id}")
            current = status(vm) or "unknown"
            if current in wanted:
                return vm
            if passing and current not in passing:
                raise EngineError(f"cannot {what}: the VM is {current}{_reason(vm)}")
            if deadline.expired():
                raise EngineError(f"cannot {what}: the VM is still {current}")
            deadline.sleep()


def status(vm):
    return vm.status.value if vm.status else None


def _topology(cpus):
    if cpus is None:
        return None
    return types.Cpu(topology=types.CpuTopology(sockets=cpus, cores=1, threads=1))


def _correlation():
    return {"correlation_id": str(uuid.uuid4())}


def _reason(vm):
    reason = getattr(vm, "status_detail", None) or getattr(vm, "stop_reason", None)
    return f" ({reason})" if reason else "; see the engine's events"
