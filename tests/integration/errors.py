# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Bad input and faults: the message each one gets and what is left after it.

The tests named here take their expected messages from this table, and
docs/errors.md is made from it (``python -m tests.integration.errors >
docs/errors.md``; test_errors_doc.py checks that the two agree). In the
messages, TMP, DOWNLOADS, CORRUPT, OTHER_CA, DISK_ID and OFFSET stand for
paths, ids and offsets a test meets; the document shows them as a user would
see them.
"""

from __future__ import annotations

import sys

NOTHING = "nothing"

# (module, case): (message, or the start of it; what is left; test)
ERRORS = {
    ("disk_upload", "missing image"): (
        "cannot read image 'TMP/missing.qcow2': no such file",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "a directory as the image"): (
        "cannot read image 'TMP': it is a directory",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "corrupt qcow2"): (
        "image 'CORRUPT' is corrupt: qemu-img check found",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "qcow2 whose backing file is missing"): (
        "cannot check image 'TMP/no-backing.qcow2': qemu-img: Could not open "
        "'TMP/no-backing.qcow2': Could not open backing file: Could not open "
        "'TMP/gone.raw': No such file or directory",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "unknown storage domain"): (
        "storage domain 'nfs9' not found; the engine has: iscsi1, nfs1, scratch",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "no storage domain for a new disk"): (
        "disk bad-input does not exist; give storage_domain to create it",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "raw sparse disk on a block domain"): (
        "storage domain iscsi1 is block storage (iscsi), which has no raw sparse disks",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "wrong password"): (
        "cannot connect to the engine: authentication failed at https://localhost:",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "CA that did not sign the engine's certificate"): (
        "cannot connect to the engine: the certificate of https://localhost:",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "missing CA file"): (
        "The CA file 'TMP/no-ca.pem' doesn't exist",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "unreachable engine"): (
        "cannot connect to the engine: the engine at https://127.0.0.1:1/ovirt-engine/api "
        "cannot be reached",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "unreachable NBD URL"): (
        "cannot read image 'nbd://127.0.0.1:1/disk': qemu-img: Could not open "
        "'nbd://127.0.0.1:1/disk': Failed to connect to '127.0.0.1:1'",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "wrong NBD export name"): (
        "export 'wrong' not present",
        NOTHING,
        "test_disk_upload.py::test_bad_upload",
    ),
    ("disk_upload", "image larger than the existing disk"): (
        "the image is 33554432 bytes but disk too-small (DISK_ID) holds only 16777216 bytes; "
        "extend the disk or upload to a new one",
        "the disk, unchanged",
        "test_disk_upload.py::test_image_larger_than_existing_disk",
    ),
    ("disk_upload", "disk locked by another transfer"): (
        "cannot start the upload of disk DISK_ID: [Cannot transfer Virtual Disk: The following "
        "disks are locked: held. Please try again in a few minutes.]",
        "the disk and the other transfer, unchanged",
        "test_disk_upload.py::test_disk_locked_by_another_transfer",
    ),
    ("disk_upload", "full block volume"): (
        "imageio answers so when the volume is full: disk small-lv (DISK_ID) is a sparse "
        "qcow2 disk on block storage domain iscsi1, whose volume has room for",
        "the disk, as the user made it",
        "test_disk_upload.py::test_block_volume_too_small_existing_disk",
    ),
    ("disk_upload", "copy slower than the timeout"): (
        "gave up after the timeout of 4 s",
        NOTHING,
        "test_disk_upload.py::test_timeout_bounds_the_copy",
    ),
    ("disk_download", "unknown disk"): (
        "disk no-such-disk not found",
        NOTHING,
        "test_disk_download.py::test_bad_download",
    ),
    ("disk_download", "destination in a missing directory"): (
        "cannot write DOWNLOADS/missing/disk.qcow2: directory DOWNLOADS/missing does not exist",
        NOTHING,
        "test_disk_download.py::test_bad_download",
    ),
    ("disk_download", "destination is a directory"): (
        "cannot write DOWNLOADS: it is a directory",
        NOTHING,
        "test_disk_download.py::test_bad_download",
    ),
    ("disk_download", "no disk given"): (
        "one of the following is required: disk_id, name",
        NOTHING,
        "test_disk_download.py::test_bad_download",
    ),
    ("disk_download", "full file system"): (
        "cannot write image 'DOWNLOADS/full/disk.qcow2' at offset OFFSET: No space left on device",
        "nothing: the transfer is finalized, the disk unchanged, no partial file",
        "test_disk_download.py::test_full_file_system",
    ),
    ("disk_download", "imageio gone longer than retry_timeout"): (
        ": cannot connect: ",
        "nothing: the transfer is finalized once the host can end it, dest keeps its old data",
        "test_disk_download.py::test_imageio_gone_longer_than_retry_timeout",
    ),
    ("disk", "no engine URL anywhere"): (
        "no engine to connect to: give auth.url or auth.hostname, or set OVIRT_URL or "
        "OVIRT_HOSTNAME in the environment",
        NOTHING,
        "test_disk.py::test_no_engine_or_credentials_anywhere",
    ),
    ("disk", "no credentials anywhere"): (
        "no credentials for the engine: give auth.username and auth.password, auth.token or "
        "auth.kerberos: true, or set OVIRT_USERNAME and OVIRT_PASSWORD (or OVIRT_TOKEN) in "
        "the environment",
        NOTHING,
        "test_disk.py::test_no_engine_or_credentials_anywhere",
    ),
    ("disk", "invalid size"): (
        "invalid size '64 parsecs'",
        NOTHING,
        "test_disk.py::test_bad_input",
    ),
    ("disk", "unreadable external disk"): (
        "Cannot read the external disk nbd:unix:/nowhere",
        NOTHING,
        "test_disk.py::test_bad_input",
    ),
}

# How the document shows what a test makes.
SHOWN = {
    "TMP": "/var/tmp",
    "DOWNLOADS": "/var/tmp/downloads",
    "CORRUPT": "/var/tmp/corrupt.qcow2",
    "OTHER_CA": "/etc/pki/other-ca.pem",
    "DISK_ID": "0d8c5a2e-…",
    "OFFSET": "5242880",
}


def message(module, case):
    return ERRORS[(module, case)][0]


def document():
    """docs/errors.md, made from ERRORS."""
    lines = [
        "# Bad input and faults",
        "",
        "What each module says when it meets a bad input or a fault, and what is",
        "left afterwards. Each row is proved by the test in its last column, run on",
        "the lab: the module's message holds the text shown, and nothing is left but",
        "what the row says (no new disk, no open transfer, no ticket, no qemu-nbd, no",
        "temporary or partial file). Paths and ids are those of an example.",
        "",
        "Made from tests/integration/errors.py; do not edit by hand.",
        "",
        "| module | bad input or fault | message | left afterwards | test |",
        "|---|---|---|---|---|",
    ]
    for (module, case), (text, left, test) in ERRORS.items():
        for key, shown in SHOWN.items():
            text = text.replace(key, shown)
        lines.append(f"| {module} | {case} | `{text}` | {left} | {test} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(document())
