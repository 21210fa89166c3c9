# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""What disk to create for an image on a storage domain.

A pure function of the image facts (see _image.inspect), the storage
domain's storage type and the user's choices, so every rule is tested as a
table and checked before anything is created. The rules are the engine's
(ImagesHandler.checkImageConfiguration) and the ones ovirt-img applies:

- an ISO becomes a raw, preallocated disk with content type iso;
- the default is a sparse qcow2 disk with incremental backup;
- a sparse qcow2 gets an initial size from ``qemu-img measure`` so a block
  domain allocates room for the data (the size of a qcow2 file, compressed
  or not, says nothing about it);
- raw sparse disks do not exist on block domains, qcow2 preallocated disks
  need incremental backup, and raw disks cannot have it.
"""

from __future__ import annotations

BLOCK_STORAGE_TYPES = ("iscsi", "fcp")


class PlanError(ValueError):
    """The requested disk cannot exist on that storage domain."""


def disk_spec(
    image,
    storage_type,
    storage_domain="the storage domain",
    disk_format=None,
    preallocated=False,
    backup=None,
    content_type="auto",
):
    """Return the disk to create as a dict of oVirt disk fields.

    image: facts with "virtual_size", "iso" and "measure" (_image.inspect).
    storage_type: the domain's storage type (nfs, iscsi, fcp, ...).
    disk_format: "qcow2" or "raw"; None chooses (raw for ISO, else qcow2).
    backup: "incremental" or "none"; None chooses (incremental for qcow2).
    content_type: "auto" (iso when the image is one, else data), "data" or "iso".

    The result has "format" ("cow" or "raw", the engine's names),
    "image_format" (the same in qemu's names, what the disk holds),
    "sparse", "backup", "content_type", "provisioned_size" and, for sparse
    qcow2 disks, "initial_size".
    """
    if content_type == "auto":
        content_type = "iso" if image.get("iso") else "data"
    if content_type == "iso":
        # A cdrom device reads the disk as raw; ovirt-img also forces it.
        if disk_format == "qcow2":
            raise PlanError("an ISO image must be uploaded as a raw disk, not qcow2")
        disk_format = "raw"
        preallocated = True
    if disk_format is None:
        disk_format = "qcow2"
    if disk_format not in ("qcow2", "raw"):
        raise PlanError(f"unsupported disk format {disk_format!r}; use qcow2 or raw")
    if backup is None:
        backup = "incremental" if disk_format == "qcow2" else "none"
    block = storage_type in BLOCK_STORAGE_TYPES
    sparse = not preallocated

    if disk_format == "raw" and backup == "incremental":
        raise PlanError("incremental backup needs a qcow2 disk; use format qcow2 or backup none")
    if disk_format == "qcow2" and preallocated and backup != "incremental":
        raise PlanError("a preallocated qcow2 disk needs incremental backup")
    if disk_format == "raw" and sparse and block:
        raise PlanError(
            f"{storage_domain} is block storage ({storage_type}), which has no raw sparse disks; "
            "use format qcow2, or preallocated: true"
        )

    spec = {
        "format": "cow" if disk_format == "qcow2" else "raw",
        "image_format": disk_format,
        "sparse": sparse,
        "backup": backup,
        "content_type": content_type,
        "provisioned_size": image["virtual_size"],
    }
    if disk_format == "qcow2" and sparse:
        spec["initial_size"] = image["measure"]["qcow2"]["required"]
    return spec
