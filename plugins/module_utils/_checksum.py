# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Block checksum, the one ovirt-imageio's ``/checksum`` computes.

The image is split into ``block_size`` blocks (the last may be shorter).
Each block is hashed on its own, and the block digests are fed in order
into an outer hash of the same algorithm; the result is the outer hex
digest. blake2b and blake2s use 32 byte digests, other algorithms their
default size. A block that the extent map says reads as zeros is never read:
the digest of a zero block is computed once.

Because the value depends only on the guest-visible bytes, a local qcow2,
the raw file it was converted to and the oVirt disk it was uploaded to all
have the same checksum.
"""

from __future__ import annotations

import hashlib

from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import KiB, MiB

DEFAULT_ALGORITHM = "blake2b"
DEFAULT_BLOCK_SIZE = 4 * MiB
MAX_BLOCK_SIZE = 16 * MiB
BLOCK_ALIGNMENT = 4 * KiB


class BlockHash:
    """Outer hash over per-block digests."""

    def __init__(self, algorithm=DEFAULT_ALGORITHM, block_size=DEFAULT_BLOCK_SIZE):
        validate(algorithm, block_size)
        self.algorithm = algorithm
        self.block_size = block_size
        if algorithm in ("blake2b", "blake2s"):
            self._kwargs = {"digest_size": 32}
        else:
            self._kwargs = {}
        self._outer = self._new()
        self._zero_digest = self._new(bytes(block_size)).digest()

    def update(self, block):
        self._outer.update(self._new(block).digest())

    def zero(self, length):
        if length == self.block_size:
            self._outer.update(self._zero_digest)
        else:
            self._outer.update(self._new(bytes(length)).digest())

    def hexdigest(self):
        return self._outer.hexdigest()

    def _new(self, data=b""):
        return hashlib.new(self.algorithm, data, **self._kwargs)


def validate(algorithm, block_size):
    if algorithm not in hashlib.algorithms_available:
        raise ValueError(
            "unsupported checksum algorithm {!r}; use one of: {}".format(
                algorithm, ", ".join(sorted(hashlib.algorithms_available))
            )
        )
    if not BLOCK_ALIGNMENT <= block_size <= MAX_BLOCK_SIZE or block_size % BLOCK_ALIGNMENT:
        raise ValueError(
            f"checksum block size {block_size} must be a multiple of 4 KiB between 4 KiB and 16 MiB"
        )


def checksum(endpoint, algorithm=DEFAULT_ALGORITHM, block_size=DEFAULT_BLOCK_SIZE):
    """Checksum the guest-visible bytes of an endpoint (see _nbd_endpoint.NbdEndpoint).

    Returns {"algorithm", "block_size", "checksum"} as imageio does.
    """
    block_hash = BlockHash(algorithm, block_size)
    size = endpoint.size
    buf = bytearray(block_size)
    view = memoryview(buf)
    zeros = memoryview(bytes(block_size))
    extents = endpoint.extents()
    ext = None
    offset = 0
    while offset < size:
        length = min(block_size, size - offset)
        end = offset + length
        # The parts of this block as (offset, length, zero), from the extents
        # that overlap it; an extent may span many blocks.
        parts = []
        pos = offset
        while pos < end:
            while ext is None or ext.start + ext.length <= pos:
                ext = next(extents)
            part = min(ext.start + ext.length, end) - pos
            parts.append((pos, part, ext.zero))
            pos += part
        if all(part[2] for part in parts):
            block_hash.zero(length)
        else:
            for pos, part, zero in parts:
                start = pos - offset
                if zero:
                    view[start : start + part] = zeros[:part]
                else:
                    endpoint.readinto(pos, view[start : start + part])
            block_hash.update(view[:length])
        offset = end
    return {
        "algorithm": algorithm,
        "block_size": block_size,
        "checksum": block_hash.hexdigest(),
    }
