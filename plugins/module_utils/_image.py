# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Facts about an image: what qemu says of it, and what its extents hold."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, suppress

from ansible_collections.thinair.ovirt.plugins.module_utils import (
    _checksum,
    _file,
    _nbd_endpoint,
    _qcow2,
    _qemu_img,
    _qemu_nbd,
)
from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import round_up

SECTOR = 512

# The formats written in place, without qemu-nbd.
WRITERS = {"raw": _file.RawWriter, "qcow2": _qcow2.Qcow2Writer}


def inspect(image, fmt=None, checksum_algorithm=None, checksum_block_size=None):
    """Return a dict of facts about a local image or an NBD URL (Source.facts).

    Raises _qemu_img.QemuError (or an NBD error) with a message naming the image.
    """
    if checksum_algorithm:
        _checksum.validate(checksum_algorithm, checksum_block_size or _checksum.DEFAULT_BLOCK_SIZE)
    with open_source(image, fmt) as source:
        return source.facts(checksum_algorithm, checksum_block_size)


class Source:
    """An image opened once for reading: what qemu-img info said of it, and
    the endpoint a copy reads (``endpoint``), open until the source closes.

    A local file stays locked as qemu locks images it reads, so what was
    planned from its facts is what is sent.
    """

    def __init__(self, image, info, endpoint):
        self.image = image
        self.info = info
        self.format = info["format"]
        self.virtual_size = info["virtual-size"]
        self.endpoint = endpoint

    def facts(self, checksum_algorithm=None, checksum_block_size=None):
        """What qemu-img info says, the data and zero bytes of the extents,
        the sizes the image takes as a raw or qcow2 disk (as qemu-img measure
        gives them) and, with checksum_algorithm, imageio's checksum."""
        info = self.info
        facts = {
            "image": self.image,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "actual_size": info.get("actual-size"),
            "backing_file": info.get("backing-filename"),
            "iso": self.format == "raw"
            and not _qemu_img.is_nbd_url(self.image)
            and _qemu_img.is_iso(self.image),
        }
        counts = {True: 0, False: 0}

        def counted(extents):
            for extent in extents:
                counts[extent.zero] += extent.length
                yield extent

        qcow2 = _qcow2.measure(self.virtual_size, counted(self.endpoint.extents()))
        # qemu measures a raw target as the virtual size in whole sectors,
        # needed and fully allocated alike (raw_measure, block/raw-format.c).
        raw = round_up(self.virtual_size, SECTOR)
        facts["measure"] = {
            "qcow2": {"required": qcow2["required"], "fully_allocated": qcow2["fully_allocated"]},
            "raw": {"required": raw, "fully_allocated": raw},
        }
        facts["data_bytes"] = counts[False]
        facts["zero_bytes"] = counts[True]
        if checksum_algorithm:
            facts["checksum"] = _checksum.checksum(
                self.endpoint,
                algorithm=checksum_algorithm,
                block_size=checksum_block_size or _checksum.DEFAULT_BLOCK_SIZE,
            )
        return facts


@contextmanager
def open_source(image, fmt=None, page_cache=True):
    """Yield the Source of a local image or an NBD URL.

    qemu-img info runs once, and qemu-img check for formats other than raw.
    A raw file, or a qcow2 file whose data lies uncompressed in the file
    itself, is read from the file (_file.FileReader); anything else is
    served by qemu-nbd (_nbd_endpoint.NbdEndpoint), which locks the file
    before this function lets go of it.
    page_cache: see _file.open_locked().
    """
    with ExitStack() as stack:
        file = _file.open_locked(image, page_cache=page_cache)
        try:
            info = _qemu_img.info(image, fmt=fmt)
            # What qemu-nbd would serve wrongly (corrupt, truncated) fails here.
            check = _qemu_img.check(image, fmt=info["format"]) if info["format"] != "raw" else None
            endpoint = _file.reader(file, info, check) if file is not None else None
            if endpoint is None:
                export = stack.enter_context(
                    _qemu_nbd.serve(image, fmt=info["format"], checked=True)
                )
                endpoint = _nbd_endpoint.NbdEndpoint(
                    export.url, allocation_depth=export.format != "raw"
                )
            stack.callback(endpoint.close)
        finally:
            if file is not None:
                # A reader of the file holds a reference of its own.
                file.release()
        yield Source(image, info, endpoint)


@contextmanager
def open_endpoint(image, fmt, page_cache=True):
    """Yield an endpoint reading a local image or an NBD URL (Source.endpoint)."""
    with open_source(image, fmt, page_cache=page_cache) as source:
        yield source.endpoint


@contextmanager
def create_endpoint(path, fmt, size):
    """Create a new local image (replacing any file at path) and yield an
    endpoint writing it.

    raw and qcow2 images are written in place (WRITERS); other formats through
    qemu-nbd. The image reads as zeros, so a copy skips zero extents. Writes
    bypass the page cache (direct I/O where the file system has it): filling
    the cache costs several times the CPU of the copy itself.
    """
    if fmt in WRITERS:
        endpoint = WRITERS[fmt](path, size)
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
    _qemu_img.create(path, fmt, size)
    with _qemu_nbd.serve(
        path, fmt=fmt, readonly=False, discard=False, detect_zeroes="off"
    ) as export:
        endpoint = _nbd_endpoint.NbdEndpoint(export.url, is_zero=True)
        try:
            yield endpoint
        finally:
            endpoint.close()
