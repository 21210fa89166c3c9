# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Facts about an image: what qemu says of it, and what its extents hold."""

from __future__ import annotations

from contextlib import contextmanager, suppress

from ansible_collections.thinair.ovirt.plugins.module_utils import _checksum, _copy, _file, _qemu

SECTOR = 512


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
    }
    # The two formats an oVirt disk can have. qemu measures a raw target as
    # the virtual size in whole sectors, needed and fully allocated alike
    # (raw_measure, block/raw-format.c): no need to ask it.
    measured = _qemu.measure(image, "qcow2", fmt=fmt)
    raw = -(-info["virtual-size"] // SECTOR) * SECTOR
    facts["measure"] = {
        "qcow2": {"required": measured["required"], "fully_allocated": measured["fully-allocated"]},
        "raw": {"required": raw, "fully_allocated": raw},
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
def open_endpoint(image, fmt, readonly=True, page_cache=True):
    """Yield an endpoint reading a local image or an NBD URL.

    A raw file, or a qcow2 file whose data lies uncompressed in the file
    itself, is read from the file (_file.FileReader); anything else, and an
    image opened for writing, is served by qemu-nbd (_copy.NbdEndpoint).
    page_cache: see _file.open_reader().
    """
    endpoint = _file.open_reader(image, fmt, page_cache=page_cache) if readonly else None
    if endpoint is not None:
        try:
            yield endpoint
        finally:
            endpoint.close()
        return
    with _qemu.serve(image, fmt=fmt, readonly=readonly) as export:
        endpoint = _copy.NbdEndpoint(export.url, allocation_depth=export.format != "raw")
        try:
            yield endpoint
        finally:
            endpoint.close()


@contextmanager
def create_endpoint(path, fmt, size):
    """Create a new local image (replacing any file at path) and yield an
    endpoint writing it.

    raw and qcow2 images are written in place (_file); other formats through
    qemu-nbd. The image reads as zeros, so a copy skips zero extents. Writes
    bypass the page cache (direct I/O where the file system has it): filling
    the cache costs several times the CPU of the copy itself.
    """
    if fmt in _file.FORMATS:
        endpoint = _file.create_writer(path, fmt, size)
        try:
            yield endpoint
        except BaseException:
            # The image is of no use after a failure; closing it must not
            # hide why (closing a qcow2 writes its metadata).
            with suppress(_file.FileError):
                endpoint.close()
            raise
        endpoint.close()
        return
    _qemu.create(path, fmt, size)
    with _qemu.serve(path, fmt=fmt, readonly=False, discard=False, detect_zeroes="off") as export:
        endpoint = _copy.NbdEndpoint(export.url, is_zero=True)
        try:
            yield endpoint
        finally:
            endpoint.close()
