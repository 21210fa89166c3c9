# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""An NBD export as a copy endpoint (see _copy): its extents from block
status, reads and writes through _nbd.Client."""

from __future__ import annotations

from ansible_collections.thinair.ovirt.plugins.module_utils import _copy, _nbd
from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import GiB, MiB
from ansible_collections.thinair.ovirt.plugins.module_utils._nbd_wire import (
    BASE_ALLOCATION,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    QEMU_ALLOCATION_DEPTH,
)

# How much of the source map one block status request asks for. Bounded so
# that a fragmented 8 TiB image never has more than one step of extents in
# memory.
EXTENTS_STEP = 2 * GiB

# NbdEndpoint sends a larger read or write as requests of at most this size,
# all in flight at once, as qemu-img convert sizes its requests: qemu-nbd
# allocates a buffer for each request, and with larger ones its memory grows
# with the copy instead of staying flat, for no gain in speed.
NBD_REQUEST_SIZE = 2 * MiB


class NbdEndpoint:
    """An NBD export as a copy endpoint.

    ``allocation_depth`` asks qemu-nbd for "qemu:allocation-depth" so holes
    in a qcow2 chain are told apart from allocated zeros. ``is_zero`` says the
    export is known to read as zeros (a new image), so a copy into it may skip
    zero extents.
    """

    def __init__(self, url, tls_certs=None, allocation_depth=False, is_zero=False):
        self.url = url
        self.tls_certs = tls_certs
        self.allocation_depth = allocation_depth
        self.is_zero = is_zero
        contexts = [BASE_ALLOCATION]
        if allocation_depth:
            contexts.append(QEMU_ALLOCATION_DEPTH)
        self._client = _nbd.Client(url, tls_certs=tls_certs, meta_contexts=tuple(contexts))
        self.size = self._client.export_size

    @property
    def max_connections(self):
        # Without multi-conn, writes on one connection may not be visible to
        # a flush on another; keep to a single connection then.
        if self._client.can_multi_conn or self._client.is_read_only:
            return 8
        return 1

    @property
    def max_request(self):
        return self._client.maximum_block_size

    def clone(self):
        return NbdEndpoint(
            self.url,
            tls_certs=self.tls_certs,
            allocation_depth=self.allocation_depth,
            is_zero=self.is_zero,
        )

    def extents(self, offset=0, length=None):
        """Yield Extent covering [offset, offset + length), merged and in order."""
        end = self.size if length is None else offset + length
        client = self._client
        pending = None
        while offset < end:
            step = min(end - offset, EXTENTS_STEP)
            if BASE_ALLOCATION not in client.contexts:
                # A server without block status: everything is data.
                replies = {BASE_ALLOCATION: [(step, 0)]}
            else:
                replies = client.extents(offset, step)
            for length_, zero, hole in _merge_contexts(replies, QEMU_ALLOCATION_DEPTH in replies):
                # The last extent of a reply may run past what was asked.
                length_ = min(length_, end - offset)
                if pending is not None and pending.zero == zero and pending.hole == hole:
                    pending = _copy.Extent(pending.start, pending.length + length_, zero, hole)
                else:
                    if pending is not None:
                        yield pending
                    pending = _copy.Extent(offset, length_, zero, hole)
                offset += length_
                if offset >= end:
                    break
        if pending is not None:
            yield pending

    def readinto(self, offset, buf):
        self.submit_readinto(offset, buf)()

    def submit_readinto(self, offset, buf):
        """Send the reads filling buf and return at once: a function that
        waits for them. Several items in flight on one connection: a slow
        link costs a round trip once, not once an item."""
        client = self._client
        view = memoryview(buf)
        handles = [
            client.submit_read(offset + start, view[start : start + NBD_REQUEST_SIZE])
            for start in range(0, len(view), NBD_REQUEST_SIZE)
        ]

        def finish():
            for handle in handles:
                client.wait(handle)

        return finish

    def forwarder(self, dst):
        """A function copying (offset, length) from this export to the NBD
        endpoint dst, the data going from socket to socket without entering
        this process (_nbd.Client.submit_forward); it returns at once a
        function that waits for the copy. None when dst is no NbdEndpoint or
        a connection uses TLS."""
        if not isinstance(dst, NbdEndpoint) or not self._client.can_forward_to(dst._client):
            return None
        src, sink = self._client, dst._client

        def submit(offset, length):
            handle, sink_handle = src.submit_forward(offset, length, sink, NBD_REQUEST_SIZE)

            def finish():
                src.wait(handle)
                sink.wait(sink_handle)

            return finish

        return submit

    def write(self, offset, buf):
        client = self._client
        view = memoryview(buf)
        for start in range(0, len(view), NBD_REQUEST_SIZE):
            client.submit_write(offset + start, view[start : start + NBD_REQUEST_SIZE])
        client.wait_all()

    def zero(self, offset, length):
        self._client.zero(offset, length)

    def flush(self):
        if self._client.can_flush:
            self._client.flush()

    def close(self):
        self._client.close()


def _merge_contexts(replies, with_depth):
    """Yield (length, zero, hole) from base:allocation and allocation depth.

    The two contexts describe the same range with different boundaries; the
    merged extents break wherever either one does:

        base:allocation   |data------|zero---------------|
        allocation-depth  |1----|0---------|1------------|
        merged            |d,1--|d,0-|z,0--|z,1----------|

    A range is a hole when its allocation depth is 0 (unallocated in the
    whole chain). Without allocation depth, qemu's NBD_STATE_HOLE is used.
    """
    base = replies[BASE_ALLOCATION]
    if not with_depth:
        for length, flags in base:
            yield length, bool(flags & NBD_STATE_ZERO), bool(flags & NBD_STATE_HOLE)
        return
    depth = replies[QEMU_ALLOCATION_DEPTH]
    i = j = 0
    base_left = base[0][0] if base else 0
    depth_left = depth[0][0] if depth else 0
    while i < len(base) and j < len(depth):
        length = min(base_left, depth_left)
        yield length, bool(base[i][1] & NBD_STATE_ZERO), depth[j][1] == 0
        base_left -= length
        depth_left -= length
        if base_left == 0:
            i += 1
            if i < len(base):
                base_left = base[i][0]
        if depth_left == 0:
            j += 1
            if j < len(depth):
                depth_left = depth[j][0]
