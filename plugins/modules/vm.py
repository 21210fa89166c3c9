#!/usr/bin/python
# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: vm
short_description: Create, start, stop or remove an oVirt VM with its disks
version_added: 0.1.0
description:
  - Brings one VM, found by name, to the state asked for, and waits until the engine reports it
    there. Idempotent by name.
  - A new VM is made from a template (C(Blank) by default) on a cluster, then gets the disks
    listed in I(disks) attached. An existing VM gets the listed disks it lacks (hot-plugged when
    it runs) and the memory, CPUs, description and comment asked for; nothing else of it changes.
extends_documentation_fragment:
  - thinair.ovirt._engine
options:
  name:
    description:
      - Name of the VM.
    type: str
    required: true
  state:
    description:
      - C(present) makes sure the VM exists, whatever its status.
      - C(running) also starts it (or resumes it when paused) and waits until it runs, that is
        C(powering_up) or C(up), or only C(up) with I(wait_for_up).
      - C(stopped) also powers it off (or shuts it down, with I(graceful)) and waits until it is
        C(down).
      - C(absent) powers it off when it runs and removes it, with its disks unless I(keep_disks).
    type: str
    choices: [present, running, stopped, absent]
    default: present
  cluster:
    description:
      - Cluster of a new VM. Required to create one.
    type: str
  template:
    description:
      - Template of a new VM.
    type: str
    default: Blank
  memory:
    description:
      - Memory of the VM, in bytes or with a unit (C(256MiB), C(4GiB)), as ovirt.ovirt's
        C(ovirt_vm) takes it. The engine's default for a new VM when left out.
    type: str
  cpus:
    description:
      - Number of virtual CPUs (sockets of one core each). The engine's default when left out.
    type: int
  description:
    description:
      - Description of the VM.
    type: str
  comment:
    description:
      - Comment of the VM.
    type: str
  disks:
    description:
      - Disks the VM must have attached, each an existing disk given by I(name) or I(id).
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Name (alias) of the disk.
        type: str
      id:
        description: Id of the disk.
        type: str
      interface:
        description: How the guest sees the disk.
        type: str
        choices: [virtio, virtio_scsi, sata, ide]
        default: virtio
      bootable:
        description: Whether the VM boots from this disk; at most one disk is bootable.
        type: bool
        default: false
      active:
        description: Whether the disk is plugged.
        type: bool
        default: true
  wait_for_up:
    description:
      - With I(state=running), wait until the VM is C(up) rather than only running. oVirt reports
        C(up) once a guest agent answers or 60 s after the start, and refuses live storage
        migration before.
    type: bool
    default: false
  graceful:
    description:
      - With I(state=stopped), ask the guest to shut down (ACPI) instead of powering the VM off.
        A guest that ignores the request stays up, and the task fails at I(timeout).
    type: bool
    default: false
  keep_disks:
    description:
      - With I(state=absent), detach the VM's disks and keep them instead of removing them.
    type: bool
    default: false
notes:
  - Check mode tells what would change and changes nothing.
  - A VM that does not reach the status asked for within I(timeout) seconds fails the task; a VM
    that falls back to C(down) while it starts fails it at once, with the engine's reason.
author:
  - thinair.ovirt contributors (@thinair)
"""

EXAMPLES = r"""
- name: A VM booting from an imported disk, running
  thinair.ovirt.vm:
    auth: "{{ ovirt_auth }}"
    name: vm1
    cluster: Default
    memory: 2GiB
    cpus: 2
    disks:
      - name: vm1-disk1
        interface: virtio_scsi
        bootable: true
      - name: vm1-disk2
    state: running
  register: vm

- name: Power it off and remove it with its disks
  thinair.ovirt.vm:
    auth: "{{ ovirt_auth }}"
    name: vm1
    state: absent
"""

RETURN = r"""
vm:
  description: The VM as the engine reports it after the task.
  returned: when the VM exists (or would, in check mode)
  type: dict
  sample: {"id": "3f6b0c9e-1f5a-4c39-9d70-0d6f8e7c2a11", "name": "vm1", "status": "up",
           "cluster": "Default", "memory": 2147483648, "cpus": 2, "description": null,
           "comment": null, "disks": [{"id": "5c3bbe8e-6f2c-4b57-8b2e-3a1bd34f5fd7",
           "name": "vm1-disk1", "interface": "virtio_scsi", "bootable": true, "active": true,
           "storage_domain": "scratch"}]}
"""


from ansible.module_utils.basic import AnsibleModule

from ansible_collections.thinair.ovirt.plugins.module_utils import _common, _engine, _vms


class VmState:
    """Bring one VM, found by name, to the state the task asks for."""

    def __init__(self, module, engine):
        self.module = module
        self.params = module.params
        self.engine = engine
        self.vms = _vms.Vms(engine)
        self.changed = False

    def run(self):
        params = self.params
        vm = self.vms.find(params["name"])
        if params["state"] == "absent":
            return self.absent(vm)
        disks = self.disks()
        if vm is None:
            if self.module.check_mode:
                planned = {"name": params["name"], "cluster": params["cluster"], "status": "down"}
                return {"changed": True, "vm": planned}
            vm = self.create()
        else:
            vm = self.update(vm)
        self.attach(vm, disks)
        status = _vms.status(vm)
        if params["state"] == "running":
            if status in ("down", "paused"):
                vm = self.act(
                    lambda: self.vms.start(vm, params["wait_for_up"], params["timeout"]), vm
                )
            elif not self.module.check_mode:
                vm = self.vms.wait_running(vm, params["wait_for_up"], params["timeout"])
        elif params["state"] == "stopped" and status != "down":
            vm = self.act(lambda: self.vms.stop(vm, params["graceful"], params["timeout"]), vm)
        return {"changed": self.changed, "vm": self.result(vm)}

    def act(self, action, unchanged=None):
        """Run an action that changes the VM, unless in check mode; its
        result, or unchanged in check mode."""
        self.changed = True
        if self.module.check_mode:
            return unchanged
        return action()

    def create(self):
        params = self.params
        if not params["cluster"]:
            self.module.fail_json(msg=f"VM {params['name']} does not exist and cluster is missing")
        self.changed = True
        return self.vms.create(
            params["name"],
            params["cluster"],
            params["template"],
            memory=self.memory(),
            cpus=params["cpus"],
            description=params["description"],
            comment=params["comment"],
        )

    def update(self, vm):
        params = self.params
        memory = self.memory()
        change = {}
        if memory is not None and vm.memory != memory:
            change["memory"] = memory
        if params["cpus"] is not None and _cpus(vm) != params["cpus"]:
            change["cpus"] = params["cpus"]
        for field in ("description", "comment"):
            if params[field] is not None and (getattr(vm, field) or "") != params[field]:
                change[field] = params[field]
        if not change:
            return vm
        return self.act(lambda: self.vms.update(vm, **change), vm)

    def disks(self):
        """The listed disks, looked up: (disk, item) pairs."""
        found = []
        for item in self.params["disks"]:
            if not (item.get("name") or item.get("id")):
                self.module.fail_json(msg="each item of disks needs a name or an id")
            disk = self.engine.disk(disk_id=item.get("id"), name=item.get("name"))
            if disk is None:
                self.module.fail_json(
                    msg="disk {} not found; create it first".format(item.get("name") or item["id"])
                )
            found.append((disk, item))
        return found

    def attach(self, vm, disks):
        attached = {a.id for a in self.vms.attachments(vm.id)}
        for disk, item in disks:
            if disk.id in attached:
                continue
            self.act(
                lambda d=disk, i=item: self.vms.attach(
                    vm, d.id, i["interface"], i["bootable"], i["active"]
                )
            )

    def absent(self, vm):
        if vm is None:
            return {"changed": False}
        params = self.params
        result = self.result(vm)
        if _vms.status(vm) != "down":
            self.act(lambda: self.vms.stop(vm, timeout=params["timeout"]))
        self.act(lambda: self.vms.remove(vm, params["keep_disks"], params["timeout"]))
        return {"changed": True, "vm": result}

    def memory(self):
        if self.params["memory"] is None:
            return None
        try:
            return _common.parse_size(self.params["memory"])
        except ValueError as e:
            self.module.fail_json(msg=str(e))

    def result(self, vm):
        disks = []
        for attachment in self.vms.attachments(vm.id):
            disk = self.engine.get_disk(attachment.id)
            domain = self.engine.disk_domain_name(disk) if disk is not None else None
            disks.append(
                {
                    "id": attachment.id,
                    "name": disk.alias if disk is not None else None,
                    "interface": attachment.interface.value if attachment.interface else None,
                    "bootable": attachment.bootable,
                    "active": attachment.active,
                    "storage_domain": domain,
                }
            )
        cluster = None
        if vm.cluster is not None:
            service = self.engine.system.clusters_service().cluster_service(vm.cluster.id)
            cluster = self.engine.call(service.get, what="look up the VM's cluster").name
        return {
            "id": vm.id,
            "name": vm.name,
            "status": _vms.status(vm),
            "cluster": cluster,
            "memory": vm.memory,
            "cpus": _cpus(vm),
            "description": vm.description,
            "comment": vm.comment,
            "disks": disks,
        }


def _cpus(vm):
    topology = vm.cpu.topology if vm.cpu is not None else None
    if topology is None:
        return None
    return (topology.sockets or 1) * (topology.cores or 1) * (topology.threads or 1)


def main():
    disk_options = {
        "name": {"type": "str"},
        "id": {"type": "str"},
        "interface": {
            "type": "str",
            "default": "virtio",
            "choices": ["virtio", "virtio_scsi", "sata", "ide"],
        },
        "bootable": {"type": "bool", "default": False},
        "active": {"type": "bool", "default": True},
    }
    module = AnsibleModule(
        argument_spec=_common.argument_spec(
            name={"type": "str", "required": True},
            state={
                "type": "str",
                "default": "present",
                "choices": ["present", "running", "stopped", "absent"],
            },
            cluster={"type": "str"},
            template={"type": "str", "default": "Blank"},
            memory={"type": "str"},
            cpus={"type": "int"},
            description={"type": "str"},
            comment={"type": "str"},
            disks={"type": "list", "elements": "dict", "default": [], "options": disk_options},
            wait_for_up={"type": "bool", "default": False},
            graceful={"type": "bool", "default": False},
            keep_disks={"type": "bool", "default": False},
        ),
        supports_check_mode=True,
    )
    _engine.run_module(module, lambda engine: VmState(module, engine).run())


if __name__ == "__main__":
    main()
