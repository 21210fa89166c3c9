#!/usr/bin/python
# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: image_info
short_description: Inspect a disk image or an NBD export
version_added: 0.1.0
description:
  - Reports what an oVirt administrator needs to know before uploading an image
    - its format, virtual size, the size a new disk needs in each format,
    whether it is an ISO, and how much of it is data.
  - Works on any image qemu reads (raw, qcow2, compressed qcow2, vmdk, vhdx,
    vdi, qed) and on NBD URLs.
  - The image is only read, never changed.
options:
  image:
    description:
      - Path of a local image, or an NBD URL
        (C(nbd://host:port/export), C(nbd+unix:///export?socket=PATH),
        C(nbd:HOST:PORT[:exportname=NAME]), C(nbd:unix:PATH[:exportname=NAME])).
    type: str
    required: true
  format:
    description:
      - Format of the image. Probed by qemu-img when not given.
      - Give it for raw images from untrusted sources, so that a raw image
        that looks like another format is read as raw.
    type: str
    choices: [raw, qcow2, vmdk, vhdx, vdi, qed, vpc]
  checksum:
    description:
      - Compute the block checksum of the guest-visible bytes, the same value
        ovirt-imageio's C(/checksum) returns for a disk holding the same data.
      - Reads every data block of the image, so it takes as long as reading
        the data.
    type: bool
    default: false
  checksum_algorithm:
    description:
      - Hash algorithm of the checksum, a name Python's hashlib knows.
    type: str
    default: blake2b
  checksum_block_size:
    description:
      - Block size of the checksum in bytes; a multiple of 4 KiB up to 16 MiB.
      - Must match the block size used on the other side when comparing.
    type: int
    default: 4194304
notes:
  - Needs C(qemu-img) and C(qemu-nbd) (package qemu-utils or qemu-img) on the node.
  - Supports check mode; the module never changes anything.
author:
  - thinair.ovirt contributors (@thinair)
"""

EXAMPLES = r"""
- name: Inspect an image before uploading it
  thinair.ovirt.image_info:
    image: /var/tmp/fedora-40.qcow2
  register: image

- name: Show what a new qcow2 disk on block storage needs
  ansible.builtin.debug:
    msg: "{{ image.virtual_size }} bytes, initial size {{ image.measure.qcow2.required }}"

- name: Checksum an NBD export
  thinair.ovirt.image_info:
    image: nbd://192.0.2.10:10809/vm1-disk1
    checksum: true
"""

RETURN = r"""
image:
  description: The image as given.
  returned: success
  type: str
  sample: /var/tmp/fedora-40.qcow2
format:
  description: Format of the image.
  returned: success
  type: str
  sample: qcow2
virtual_size:
  description: Size of the image as a guest sees it, in bytes.
  returned: success
  type: int
  sample: 6442450944
actual_size:
  description: Bytes the image takes on its storage; absent for NBD URLs.
  returned: when known
  type: int
  sample: 1621295104
backing_file:
  description: Backing file of the image, if it has one.
  returned: success
  type: str
  sample: null
iso:
  description:
    - Whether the image is an ISO 9660 image.
    - ISO images are uploaded as raw, preallocated disks with content type iso.
  returned: success
  type: bool
  sample: false
measure:
  description: Bytes a new image of each format needs to hold this image (qemu-img measure).
  returned: success
  type: dict
  contains:
    qcow2:
      description: Sizes for a qcow2 target; C(required) is the initial size of a sparse disk.
      type: dict
      returned: success
      sample: {"required": 1623851008, "fully_allocated": 6443696128}
    raw:
      description: Sizes for a raw target.
      type: dict
      returned: success
      sample: {"required": 6442450944, "fully_allocated": 6442450944}
data_bytes:
  description: Bytes of the image that hold data (must be copied).
  returned: success
  type: int
  sample: 1610612736
zero_bytes:
  description: Bytes of the image that read as zeros (skipped by uploads to new disks).
  returned: success
  type: int
  sample: 4831838208
checksum:
  description: Block checksum of the guest-visible bytes.
  returned: when I(checksum=true)
  type: dict
  sample: {"algorithm": "blake2b", "block_size": 4194304, "checksum": "9c1ba0e4f0..."}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.thinair.ovirt.plugins.module_utils import _image, _nbd, _qemu_img


def main():
    module = AnsibleModule(
        argument_spec={
            "image": {"type": "str", "required": True},
            "format": {
                "type": "str",
                "choices": ["raw", "qcow2", "vmdk", "vhdx", "vdi", "qed", "vpc"],
            },
            "checksum": {"type": "bool", "default": False},
            "checksum_algorithm": {"type": "str", "default": "blake2b"},
            "checksum_block_size": {"type": "int", "default": 4194304},
        },
        supports_check_mode=True,
    )
    params = module.params
    try:
        facts = _image.inspect(
            params["image"],
            fmt=params["format"],
            checksum_algorithm=params["checksum_algorithm"] if params["checksum"] else None,
            checksum_block_size=params["checksum_block_size"],
        )
    except (_qemu_img.QemuError, _nbd.Error, ValueError) as e:
        module.fail_json(msg=str(e), image=params["image"])
    module.exit_json(changed=False, **facts)


if __name__ == "__main__":
    main()
