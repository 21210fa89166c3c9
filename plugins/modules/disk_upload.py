#!/usr/bin/python
# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: disk_upload
short_description: Upload a disk image to an oVirt disk
version_added: 0.1.0
description:
  - Uploads any image qemu reads (raw, qcow2, compressed qcow2, vmdk, vhdx, vdi, qed, ISO), or the
    data of an NBD export, to a new or an existing oVirt disk.
  - For a new disk, chooses what ovirt-img would, and says no before creating anything when the
    storage domain cannot hold it. An ISO becomes a raw, preallocated disk with content type iso.
    Otherwise the disk is a sparse qcow2 with incremental backup unless I(format),
    I(preallocated) or I(backup) say otherwise; a sparse qcow2 gets an initial size measured with
    C(qemu-img measure), so block storage has room for the data.
  - Streams over NBD and the imageio HTTP API with several connections, skips zero extents on new
    disks, uses imageio's unix socket when it runs on the transfer host, and falls back to the
    engine's imageio proxy when the host cannot be reached.
  - Idempotent. An existing disk (by I(disk_id) or I(name)) that already holds the image's data,
    compared by checksum, is left alone (C(changed=false)) unless I(force=true).
  - A disk larger than the image (an existing disk, or a raw disk on block storage, whose size is
    rounded up to whole extents) reads as the image followed by zeros; the upload writes those
    zeros into an existing disk, and the checksum comparison expects them.
  - On failure nothing is left behind, and the module returns only once the engine is done. The
    transfer of a new disk is cancelled and the engine removes the disk. The transfer of an
    existing disk is finalized instead, since the engine removes the disk of any cancelled upload;
    the disk is kept, but may hold part of the new data.
  - For progress while it runs, start it with C(async) and give I(progress_file); the
    C(thinair.ovirt.upload_disk) role does that and prints progress lines.
extends_documentation_fragment:
  - thinair.ovirt._engine
  - thinair.ovirt._engine.transfer
options:
  image:
    description:
      - Path of a local image, or an NBD URL (C(nbd://), C(nbd+unix://), C(nbd:unix:...)).
    type: str
    required: true
  image_format:
    description:
      - Format of the image. Probed by qemu-img when not given.
    type: str
    choices: [raw, qcow2, vmdk, vhdx, vdi, qed, vpc]
  storage_domain:
    description:
      - Name of the storage domain of a new disk. Required to create one.
    type: str
  name:
    description:
      - Name (alias) of the disk. An existing disk with this name is uploaded into.
      - Defaults to the image's file name without its extension for a new disk.
    type: str
  disk_id:
    description:
      - Id of an existing disk to upload into, or the id to give a new disk.
    type: str
  description:
    description:
      - Description of a new disk.
    type: str
    default: Uploaded by thinair.ovirt
  format:
    description:
      - Format of a new disk. C(qcow2) unless the image is an ISO, which is always raw.
    type: str
    choices: [qcow2, raw]
  preallocated:
    description:
      - Create a preallocated disk instead of a sparse one.
    type: bool
    default: false
  backup:
    description:
      - Backup mode of a new disk; C(incremental) for qcow2 and C(none) for raw by default.
    type: str
    choices: [incremental, none]
  content_type:
    description:
      - Content type of a new disk; C(auto) makes ISO images C(iso) and others C(data).
    type: str
    choices: [auto, data, iso]
    default: auto
  verify:
    description:
      - Compare the checksum of the disk with the checksum of the image after the upload.
    type: bool
    default: false
  force:
    description:
      - Upload even when an existing disk already holds the image's data.
    type: bool
    default: false
notes:
  - Needs C(qemu-img) and C(qemu-nbd) on the node, and the ovirt-engine-sdk-python package.
  - Check mode returns the plan (the disk it would create) and changes nothing.
author:
  - thinair.ovirt contributors (@thinair)
"""

EXAMPLES = r"""
- name: Upload a qcow2 image to a new disk on block storage
  thinair.ovirt.disk_upload:
    auth: "{{ ovirt_auth }}"
    image: /var/tmp/fedora-40.qcow2
    storage_domain: iscsi1
  register: upload

- name: Upload an ISO for the installer
  thinair.ovirt.disk_upload:
    auth: "{{ ovirt_auth }}"
    image: /var/tmp/Fedora-Server-dvd-x86_64-40.iso
    storage_domain: nfs1
    name: fedora-40-dvd

- name: Upload the data of an NBD export into an existing disk, and verify it
  thinair.ovirt.disk_upload:
    auth: "{{ ovirt_auth }}"
    image: nbd://192.0.2.10:10809/vm1-disk1
    disk_id: 5c3bbe8e-6f2c-4b57-8b2e-3a1bd34f5fd7
    verify: true
"""

RETURN = r"""
plan:
  description: The disk the module creates (or would create, in check mode), or the existing disk.
  returned: always
  type: dict
  sample: {"format": "cow", "image_format": "qcow2", "sparse": true, "backup": "incremental",
           "content_type": "data", "provisioned_size": 6442450944, "initial_size": 1623851008,
           "name": "fedora-40", "storage_domain": "iscsi1"}
disk:
  description: The disk after the upload.
  returned: success, not in check mode
  type: dict
  sample: {"id": "5c3bbe8e-6f2c-4b57-8b2e-3a1bd34f5fd7", "name": "fedora-40", "format": "cow",
           "sparse": true, "provisioned_size": 6442450944, "actual_size": 1631584256,
           "content_type": "data", "backup": "incremental", "status": "ok",
           "storage_domain": "iscsi1", "description": "Uploaded by thinair.ovirt"}
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
    - What moved. C(bytes) is the size of the disk. C(endpoint) is C(unix) (imageio's local
      socket), C(host) or C(proxy).
    - C(retries) names each request to imageio that lost its connection (a daemon restart) and
      was sent again, and how that ended (see I(retry_timeout)).
  returned: when data was uploaded
  type: dict
  sample: {"bytes": 6442450944, "data_bytes": 1610612736, "zero_bytes": 4831838208,
           "seconds": 7.9, "rate": 815501283, "connections": 4, "endpoint": "host",
           "url": "https://host1.example.com:54322/images/0d8c...", "retries": []}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.thinair.ovirt.plugins.module_utils import _common, _transfer


def main():
    module = AnsibleModule(
        argument_spec=_common.argument_spec(
            image={"type": "str", "required": True},
            image_format={
                "type": "str",
                "choices": ["raw", "qcow2", "vmdk", "vhdx", "vdi", "qed", "vpc"],
            },
            storage_domain={"type": "str"},
            name={"type": "str"},
            disk_id={"type": "str"},
            description={"type": "str", "default": "Uploaded by thinair.ovirt"},
            format={"type": "str", "choices": ["qcow2", "raw"]},
            preallocated={"type": "bool", "default": False},
            backup={"type": "str", "choices": ["incremental", "none"]},
            content_type={"type": "str", "choices": ["auto", "data", "iso"], "default": "auto"},
            verify={"type": "bool", "default": False},
            force={"type": "bool", "default": False},
            **_common.TRANSFER_OPTIONS,
        ),
        supports_check_mode=True,
    )
    _transfer.run_module(module, _transfer.upload, description=module.params["image"])


if __name__ == "__main__":
    main()
