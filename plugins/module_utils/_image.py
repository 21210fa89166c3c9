# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Facts about an image: what qemu says of it, and what its extents hold."""

from __future__ import annotations

from contextlib import contextmanager

from ansible_collections.thinair.ovirt.plugins.module_utils import _checksum, _copy, _qemu

# The formats an oVirt disk can have, and so the targets measured.
TARGET_FORMATS = ("qcow2", "raw")


def inspect(image, fmt=None, checksum_algorithm=None, checksum_block_size=None):
    """Return a dict of facts about a local image or an NBD URL.

    Raises _qemu.QemuError (or an NBD error) with a message naming the image.
    """
    if checksum_algorithm:
        _checksum.validate(checksum_algorithm, checksum_block_size or _checksum.DEFAULT_BLOCK_SIZE)
    info = _qemu.info(image, fmt=fmt)
    fmt = info["format"]
    facts = {
        "image": image,
        "format": fmt,
        "virtual_size": info["virtual-size"],
        "actual_size": info.get("actual-size"),
        "backing_file": info.get("backing-filename"),
        "iso": fmt == "raw" and not _qemu.is_nbd_url(image) and _qemu.is_iso(image),
        "measure": {},
    }
    for target in TARGET_FORMATS:
        measured = _qemu.measure(image, target, fmt=fmt)
        facts["measure"][target] = {
            "required": measured["required"],
            "fully_allocated": measured["fully-allocated"],
        }
    with open_endpoint(image, fmt) as endpoint:
        data = zero = 0
        for ext in endpoint.extents():
            if ext.zero:
                zero += ext.length
            else:
                data += ext.length
        facts["data_bytes"] = data
        facts["zero_bytes"] = zero
        if checksum_algorithm:
            facts["checksum"] = _checksum.checksum(
                endpoint,
                algorithm=checksum_algorithm,
                block_size=checksum_block_size or _checksum.DEFAULT_BLOCK_SIZE,
            )
    return facts


@contextmanager
def open_endpoint(image, fmt, readonly=True):
    """Serve an image with qemu-nbd and yield an NbdEndpoint reading it."""
    with _qemu.serve(image, fmt=fmt, readonly=readonly) as export:
        endpoint = _copy.NbdEndpoint(export.url, allocation_depth=export.format != "raw")
        try:
            yield endpoint
        finally:
            endpoint.close()


@contextmanager
def create_endpoint(path, fmt, size):
    """Create a new local image and yield an NbdEndpoint writing it.

    The image reads as zeros, so a copy skips zero extents; writes go
    through the page cache (flushed at the end of the copy), which is much
    faster for a local file than qemu-nbd's default of writing through it.
    """
    _qemu.create(path, fmt, size)
    with _qemu.serve(
        path,
        fmt=fmt,
        readonly=False,
        cache="writeback",
        aio="threads",
        discard=False,
        detect_zeroes="off",
    ) as export:
        endpoint = _copy.NbdEndpoint(export.url, is_zero=True)
        try:
            yield endpoint
        finally:
            endpoint.close()
