# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import pytest

from ansible_collections.thinair.ovirt.plugins.module_utils._plan import PlanError, disk_spec

GiB = 1024**3

IMAGE = {
    "virtual_size": 6 * GiB,
    "iso": False,
    "measure": {"qcow2": {"required": 1623851008}, "raw": {"required": 6 * GiB}},
}
RAW = {"disk_format": "raw"}
PREALLOCATED = {"preallocated": True}
ISO = {"virtual_size": 3 * GiB, "iso": True, "measure": IMAGE["measure"]}

# (image, storage type, options) -> (format, sparse, backup, content type, initial size)
ALLOWED = [
    (IMAGE, "nfs", {}, ("cow", True, "incremental", "data", 1623851008)),
    (IMAGE, "iscsi", {}, ("cow", True, "incremental", "data", 1623851008)),
    (IMAGE, "fcp", {"backup": "none"}, ("cow", True, "none", "data", 1623851008)),
    (IMAGE, "nfs", PREALLOCATED, ("cow", False, "incremental", "data", None)),
    (IMAGE, "iscsi", PREALLOCATED, ("cow", False, "incremental", "data", None)),
    (IMAGE, "nfs", RAW, ("raw", True, "none", "data", None)),
    (IMAGE, "nfs", {**RAW, **PREALLOCATED}, ("raw", False, "none", "data", None)),
    (IMAGE, "iscsi", {**RAW, **PREALLOCATED}, ("raw", False, "none", "data", None)),
    (ISO, "nfs", {}, ("raw", False, "none", "iso", None)),
    (ISO, "iscsi", {}, ("raw", False, "none", "iso", None)),
    (ISO, "nfs", {"content_type": "data"}, ("cow", True, "incremental", "data", 1623851008)),
    (IMAGE, "nfs", {"content_type": "iso"}, ("raw", False, "none", "iso", None)),
]  # fmt: skip


@pytest.mark.parametrize("image,storage_type,options,expected", ALLOWED)
def test_allowed(image, storage_type, options, expected):
    spec = disk_spec(image, storage_type, **options)
    fmt, sparse, backup, content_type, initial_size = expected
    assert spec["format"] == fmt
    assert spec["image_format"] == ("qcow2" if fmt == "cow" else "raw")
    assert spec["sparse"] is sparse
    assert spec["backup"] == backup
    assert spec["content_type"] == content_type
    assert spec["provisioned_size"] == image["virtual_size"]
    assert spec.get("initial_size") == initial_size


REFUSED = [
    (IMAGE, "iscsi", RAW, r"iscsi1 is block storage \(iscsi\), which has no raw"),
    (IMAGE, "fcp", RAW, "no raw sparse disks"),
    (IMAGE, "nfs", {**PREALLOCATED, "backup": "none"}, "preallocated qcow2 disk needs incremental"),
    (IMAGE, "nfs", {**RAW, "backup": "incremental"}, "incremental backup needs a qcow2"),
    (ISO, "nfs", {"disk_format": "qcow2"}, "ISO image must be uploaded as a raw disk"),
    (IMAGE, "nfs", {"disk_format": "vmdk"}, "unsupported disk format 'vmdk'"),
]  # fmt: skip


@pytest.mark.parametrize("image,storage_type,options,message", REFUSED)
def test_refused(image, storage_type, options, message):
    with pytest.raises(PlanError, match=message):
        disk_spec(image, storage_type, storage_domain="iscsi1", **options)
