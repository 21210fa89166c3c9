#!/usr/bin/python
# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: disk
short_description: Create or remove an oVirt disk, external ones included
version_added: 0.1.0
description:
  - Creates a floating disk on a storage domain and waits until the engine reports it C(ok), or
    removes one and waits until it is gone. Idempotent by name.
  - With I(external_disk), asks for a disk whose data comes from an image outside oVirt, given as
    an NBD URL (C(nbd:HOST:PORT[:exportname=NAME]), C(nbd:unix:PATH[:exportname=NAME]),
    C(nbd://HOST:PORT/NAME)) or a path on the hosts (C(Disk.external_disk) of the oVirt API,
    since 4.4). A VM using the disk reads what it has not written from there, and a disk move
    copies it into oVirt storage. Use a file storage domain meant for temporary disks.
  - Released oVirt engines do not implement C(external_disk). They create an ordinary, empty disk
    and do not return the field. The result's C(external) says which happened, so a play can
    remove the disk and copy the data instead.
extends_documentation_fragment:
  - thinair.ovirt._engine
options:
  name:
    description:
      - Name (alias) of the disk. It must name at most one disk.
    type: str
    required: true
  state:
    description:
      - C(present) creates the disk unless a disk with this name exists; C(absent) removes it.
    type: str
    choices: [present, absent]
    default: present
  storage_domain:
    description:
      - Storage domain of a new disk. Required with I(state=present).
    type: str
  size:
    description:
      - Virtual size of a new disk, in bytes or with a unit (C(256MiB), C(4GiB), C(1TiB)).
      - Required with I(state=present); with I(external_disk), at least the external image's size.
    type: str
  format:
    description:
      - Format of a new disk; C(cow) is qcow2. An external disk is always C(cow).
    type: str
    choices: [cow, raw]
    default: cow
  sparse:
    description:
      - Whether a new disk is thin provisioned. An external disk is always sparse.
    type: bool
    default: true
  description:
    description:
      - Description of a new disk.
    type: str
  external_disk:
    description:
      - URL or path of the image whose data the new disk reads, see above.
    type: str
notes:
  - An existing disk is never changed; a disk with this name on another domain, of another size
    or for another I(external_disk) is reported as a failure, not replaced.
  - Check mode tells whether the disk would be created or removed and changes nothing.
author:
  - thinair.ovirt contributors (@thinair)
"""

EXAMPLES = r"""
- name: A temporary disk reading a VM's disk from its NBD export
  thinair.ovirt.disk:
    auth: "{{ ovirt_auth }}"
    name: vm1-disk1
    storage_domain: scratch
    size: 20GiB
    external_disk: "nbd:source.example.com:10809:exportname=vm1-disk1"
    description: imported by thinair.ovirt
  register: disk

- name: Fall back when the engine ignored external_disk
  ansible.builtin.debug:
    msg: "The engine created an ordinary disk; copy the data instead"
  when: not disk.external

- name: Remove it
  thinair.ovirt.disk:
    auth: "{{ ovirt_auth }}"
    name: vm1-disk1
    state: absent
"""

RETURN = r"""
disk:
  description: The disk as the engine reports it; absent when there is none.
  returned: when the disk exists (or would, in check mode)
  type: dict
  sample: {"id": "5c3bbe8e-6f2c-4b57-8b2e-3a1bd34f5fd7", "name": "vm1-disk1", "format": "cow",
           "sparse": true, "provisioned_size": 21474836480, "status": "ok",
           "storage_domain": "scratch", "external_disk": "nbd:source.example.com:10809"}
external:
  description:
    - Whether the disk reads its data from I(external_disk). False when the engine ignored the
      field (a released engine) or none was asked for.
  returned: with I(state=present)
  type: bool
  sample: true
"""


from ansible.module_utils.basic import AnsibleModule

from ansible_collections.thinair.ovirt.plugins.module_utils import _common, _engine


class DiskState:
    """Bring one disk, found by name, to the state the task asks for."""

    def __init__(self, module, engine):
        self.module = module
        self.params = module.params
        self.engine = engine

    def run(self):
        disk = self.engine.disk(name=self.params["name"])
        if self.params["state"] == "absent":
            return self.absent(disk)
        return self.present(disk)

    def present(self, disk):
        params = self.params
        size = self.size()
        if disk is not None:
            self.check_matches(disk, size)
            return {"changed": False, "disk": self.result(disk), "external": _external(disk)}
        if self.module.check_mode:
            planned = {"name": params["name"], "storage_domain": params["storage_domain"],
                       "provisioned_size": size}  # fmt: skip
            return {"changed": True, "disk": planned, "external": bool(params["external_disk"])}
        self.engine.storage_domain(params["storage_domain"])
        external = params["external_disk"]
        fmt = "cow" if external else params["format"]
        spec = {
            "format": fmt,
            "sparse": True if external else params["sparse"],
            "provisioned_size": size,
            "backup": "incremental" if fmt == "cow" else "none",
            "content_type": "data",
        }
        disk = self.engine.create_disk(
            spec,
            params["storage_domain"],
            params["name"],
            description=params["description"],
            external_disk=external,
        )
        return {"changed": True, "disk": self.result(disk), "external": _external(disk)}

    def absent(self, disk):
        if disk is None:
            return {"changed": False}
        if not self.module.check_mode:
            self.engine.wait_disk_ok(disk.id, what=f"remove disk {disk.alias}")
            self.engine.remove_disk(disk.id, timeout=self.params["timeout"])
        return {"changed": True, "disk": self.result(disk)}

    def size(self):
        params = self.params
        for option in ("storage_domain", "size"):
            if not params[option]:
                self.module.fail_json(msg=f"state is present but {option} is missing")
        try:
            return _common.parse_size(params["size"])
        except ValueError as e:
            self.module.fail_json(msg=str(e))

    def check_matches(self, disk, size):
        """A disk of this name that is not the one asked for is an error."""
        params = self.params
        domain = self.engine.disk_domain_name(disk)
        wrong = []
        if domain != params["storage_domain"]:
            wrong.append(f"it is on storage domain {domain}, not {params['storage_domain']}")
        if disk.provisioned_size != size:
            wrong.append(f"its size is {disk.provisioned_size}, not {size}")
        asked = params["external_disk"]
        if asked and disk.external_disk and disk.external_disk != asked:
            wrong.append(f"it reads {disk.external_disk}, not {asked}")
        if wrong:
            self.module.fail_json(
                msg="disk {} exists but {}; remove it or choose another name".format(
                    params["name"], "; ".join(wrong)
                )
            )

    def result(self, disk):
        return {
            "id": disk.id,
            "name": disk.alias or disk.name,
            "format": disk.format.value if disk.format else None,
            "sparse": disk.sparse,
            "provisioned_size": disk.provisioned_size,
            "status": disk.status.value if disk.status else None,
            "storage_domain": self.engine.disk_domain_name(disk),
            "external_disk": disk.external_disk,
        }


def _external(disk):
    return bool(disk.external_disk)


def main():
    module = AnsibleModule(
        argument_spec=_common.argument_spec(
            name={"type": "str", "required": True},
            state={"type": "str", "choices": ["present", "absent"], "default": "present"},
            storage_domain={"type": "str"},
            size={"type": "str"},
            format={"type": "str", "choices": ["cow", "raw"], "default": "cow"},
            sparse={"type": "bool", "default": True},
            description={"type": "str"},
            external_disk={"type": "str"},
        ),
        supports_check_mode=True,
    )
    _engine.run_module(module, lambda engine: DiskState(module, engine).run())


if __name__ == "__main__":
    main()
