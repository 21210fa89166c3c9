#!/usr/bin/python
# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: disk_download
short_description: Download an oVirt disk or disk snapshot to a local image
version_added: 0.1.0
description:
  - Downloads the guest-visible data of an oVirt disk, or of one of its snapshots, to a local
    qcow2 or raw image, sparse, skipping the disk's zero extents.
  - Streams over the imageio HTTP API with several connections, through imageio's unix socket
    when it runs on the transfer host, and through the engine's imageio proxy when the host cannot
    be reached.
  - Writes to a hidden temporary file beside I(dest) and renames it only when the download is
    complete and the transfer finalized, so I(dest) is never half written, and is left as it was
    when the download fails. The transfer is always finalized, also on failure, and the module
    returns only once the engine is done with it, so the disk is never left locked.
  - Idempotent. An existing I(dest) that holds the disk's data, compared by checksum, is left
    alone (C(changed=false)) unless I(force=true).
extends_documentation_fragment:
  - thinair.ovirt._engine
  - thinair.ovirt._engine.transfer
options:
  disk_id:
    description:
      - Id of the disk. One of I(disk_id) and I(name) is required.
    type: str
  name:
    description:
      - Name (alias) of the disk, when it names exactly one disk.
    type: str
  snapshot_id:
    description:
      - Id of a snapshot of the disk to download instead of its current data.
    type: str
  dest:
    description:
      - Path of the local image to write. Its directory must exist.
    type: path
    required: true
  format:
    description:
      - Format of the local image.
    type: str
    choices: [qcow2, raw]
    default: qcow2
  verify:
    description:
      - Compare the checksum of the local image with the checksum of the disk after the download.
    type: bool
    default: false
  force:
    description:
      - Download even when I(dest) already holds the disk's data.
    type: bool
    default: false
notes:
  - Needs C(qemu-img) and C(qemu-nbd) on the node, and the ovirt-engine-sdk-python package.
  - Check mode tells whether a download would happen and changes nothing.
author:
  - thinair.ovirt contributors (@thinair)
"""

EXAMPLES = r"""
- name: Download a disk to a qcow2 image
  thinair.ovirt.disk_download:
    auth: "{{ ovirt_auth }}"
    name: db1-data
    dest: /var/backup/db1-data.qcow2

- name: Download a snapshot as raw, and verify it
  thinair.ovirt.disk_download:
    auth: "{{ ovirt_auth }}"
    disk_id: 5c3bbe8e-6f2c-4b57-8b2e-3a1bd34f5fd7
    snapshot_id: 0a1f3c0e-9f6e-4a44-8c8e-1b7c2b2a8f11
    dest: /var/backup/db1-data.raw
    format: raw
    verify: true
"""

RETURN = r"""
dest:
  description: Absolute path of the local image.
  returned: always
  type: str
  sample: /var/backup/db1-data.qcow2
format:
  description: Format of the local image.
  returned: always
  type: str
  sample: qcow2
disk:
  description: The disk that was downloaded.
  returned: always
  type: dict
  sample: {"id": "5c3bbe8e-6f2c-4b57-8b2e-3a1bd34f5fd7", "name": "db1-data", "format": "cow",
           "sparse": true, "provisioned_size": 6442450944, "actual_size": 1631584256,
           "status": "ok", "storage_domain": "iscsi1"}
engine_retries:
  description:
    - Calls to the engine answered 409 or 5xx, or whose connection was lost, and sent again (or
      found done); one line each.
  returned: when there were any
  type: list
  elements: str
  sample: ["watch transfer 0d8c...: Service Unavailable; sent again"]
stale_transfers:
  description:
    - Transfers a module killed without warning (SIGKILL, a reboot) had left open on this node
      for the same engine, ended before this one started; one line each.
  returned: when there were any
  type: list
  elements: str
  sample: ["cancelled transfer 0d8c... of disk 5c3b..., left open by process 4242; the engine
            removed the new disk"]
transfer:
  description:
    - What moved. C(endpoint) is C(unix) (imageio's local socket), C(host) or C(proxy).
    - C(retries) names each request to imageio that lost its connection (a daemon restart) and
      was sent again, and how that ended (see I(retry_timeout)).
  returned: when data was downloaded
  type: dict
  sample: {"bytes": 6442450944, "data_bytes": 1610612736, "zero_bytes": 4831838208,
           "seconds": 6.1, "rate": 1056139499, "connections": 4, "endpoint": "unix",
           "url": "https://host1.example.com:54322/images/0d8c...", "retries": []}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.thinair.ovirt.plugins.module_utils import _common, _transfer


def main():
    module = AnsibleModule(
        argument_spec=_common.argument_spec(
            disk_id={"type": "str"},
            name={"type": "str"},
            snapshot_id={"type": "str"},
            dest={"type": "path", "required": True},
            format={"type": "str", "choices": ["qcow2", "raw"], "default": "qcow2"},
            verify={"type": "bool", "default": False},
            force={"type": "bool", "default": False},
            **_common.TRANSFER_OPTIONS,
        ),
        required_one_of=[("disk_id", "name")],
        supports_check_mode=True,
    )
    _transfer.run_module(module, _transfer.download, description=module.params["dest"])


if __name__ == "__main__":
    main()
