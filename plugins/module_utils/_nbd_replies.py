# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Receiving the server's replies (proto.md, "Transmission"): simple replies
and structured reply chunks, read data into the caller's buffers or
forwarded to another connection, as a part of _nbd.Client."""

from __future__ import annotations

from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import ZEROS
from ansible_collections.thinair.ovirt.plugins.module_utils._nbd_wire import (
    CHUNK,
    COMMAND_NAMES,
    DATA_OFFSET,
    ERROR,
    ERROR_NAMES,
    ERROR_OFFSET,
    EXTENT,
    HOLE,
    MAGIC,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_ESHUTDOWN,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR_BIT,
    NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    SIMPLE_REPLY,
    STATUS_CONTEXT,
    ProtocolError,
    RequestError,
)

# Error chunks are small; anything larger is a broken server.
_MAX_ERROR_CHUNK = 64 * 1024
# A block status chunk should hold at most 2**20 extents; allow twice that.
_MAX_STATUS_CHUNK = 4 + 8 * (1 << 21)


class RepliesMixin:
    """The receiving half of _nbd.Client's transmission phase."""

    def _receive_reply(self):
        """Receive one simple reply or one structured reply chunk."""
        self._check_ready()
        header = self._header
        self._recv_into(header[: SIMPLE_REPLY.size])
        (magic,) = MAGIC.unpack_from(header)
        if magic == NBD_STRUCTURED_REPLY_MAGIC:
            self._recv_into(header[SIMPLE_REPLY.size :])
            flags, kind, cookie, length = CHUNK.unpack_from(header)[1:]
            request = self._inflight_request(cookie)
            self._receive_chunk(request, kind, length)
            if flags & NBD_REPLY_FLAG_DONE:
                self._complete(request)
        elif magic == NBD_SIMPLE_REPLY_MAGIC:
            error, cookie = SIMPLE_REPLY.unpack_from(header)[1:]
            request = self._inflight_request(cookie)
            if error:
                self._request_failed(request, error, "")
            elif request.command == NBD_CMD_READ:
                if self.structured_replies:
                    raise self._broken(
                        f"{self.url}: simple reply to a read after structured replies "
                        f"were negotiated"
                    )
                if request.sink is not None:
                    self._forward(request, request.offset, request.length)
                else:
                    self._recv_into(request.view)
                request.received = request.length
            self._complete(request)
        else:
            raise self._broken(f"{self.url}: bad reply magic 0x{magic:x}")

    def _receive_chunk(self, request, kind, length):
        if kind == NBD_REPLY_TYPE_OFFSET_DATA:
            self._receive_data(request, length)
        elif kind == NBD_REPLY_TYPE_OFFSET_HOLE:
            self._receive_hole(request, length)
        elif kind == NBD_REPLY_TYPE_BLOCK_STATUS:
            self._receive_block_status(request, length)
        elif kind == NBD_REPLY_TYPE_NONE:
            if length != 0:
                raise self._broken(f"{self.url}: NBD_REPLY_TYPE_NONE chunk with a payload")
        elif kind & NBD_REPLY_TYPE_ERROR_BIT:
            self._receive_error(request, kind, length)
        else:
            raise self._broken(f"{self.url}: unknown structured reply type {kind}")

    # A read may be answered by several chunks, in any order, that together
    # cover the request without overlapping; holes are not sent as data:
    #
    #   request    offset                                   offset + length
    #              |<------------------- length ------------------->|
    #   chunks     | DATA (2) |      HOLE (1)      |    DATA (3)    | NONE, DONE
    #
    # Data goes straight from the socket into the caller's buffer at
    # (chunk offset - request offset); holes are filled with zeros there. A
    # forwarded read (Client.submit_forward) has no buffer: each data chunk
    # becomes a write at its offset on the sink, each hole a zero request.

    def _receive_data(self, request, length):
        if request.command != NBD_CMD_READ or length <= DATA_OFFSET.size:
            raise self._broken(
                f"{self.url}: invalid data chunk of {length} bytes for a "
                f"{COMMAND_NAMES.get(request.command)} request"
            )
        offset_view = self._payload[: DATA_OFFSET.size]
        self._recv_into(offset_view)
        (offset,) = DATA_OFFSET.unpack_from(offset_view)
        size = length - DATA_OFFSET.size
        start = self._chunk_start(request, offset, size)
        if request.sink is not None:
            self._forward(request, offset, size)
        else:
            self._recv_into(request.view[start : start + size])
        request.received += size

    def _receive_hole(self, request, length):
        if request.command != NBD_CMD_READ or length != HOLE.size:
            raise self._broken(f"{self.url}: invalid hole chunk of {length} bytes")
        self._recv_into(self._payload)
        offset, size = HOLE.unpack_from(self._payload)
        start = self._chunk_start(request, offset, size)
        if request.sink is not None:
            sink, sink_operation = self._sink(request)
            sink._send_zero(sink_operation, 0, offset, size)
            request.received += size
            return
        view = request.view
        end = start + size
        while start < end:
            step = min(len(ZEROS), end - start)
            view[start : start + step] = ZEROS[:step]
            start += step
        request.received += size

    def _forward(self, request, offset, size):
        """Send the next size bytes of this socket to the request's sink as
        a write at offset."""
        sink, sink_operation = self._sink(request)
        sink._send_request(sink_operation, NBD_CMD_WRITE, 0, offset, size, source=self)

    def _sink(self, request):
        """The request's sink and operation, if the sink can still take
        requests; otherwise the rest of the reply cannot be read in step."""
        sink = request.sink[0]
        try:
            sink._check_ready()
        except ProtocolError as e:
            raise self._broken(f"{self.url}: cannot forward the data of a read: {e}") from e
        return request.sink

    def _chunk_start(self, request, offset, size):
        start = offset - request.offset
        if size == 0 or start < 0 or start + size > request.length:
            raise self._broken(
                f"{self.url}: chunk at offset {offset} length {size} is outside the read "
                f"at offset {request.offset} length {request.length}"
            )
        return start

    # Block status comes as one chunk per metadata context, in any order. Each
    # chunk lists consecutive extents from the request offset; the list may end
    # before the requested length, or its last extent may run past it:
    #
    #   request     |<------------- length ------------->|
    #   short       |<- e1 ->|<-- e2 -->|                     ask again from here
    #   long        |<- e1 ->|<------------- e2 ------------------>|
    #
    # A server splitting one context over several chunks continues the list,
    # so chunks for the same context are appended in arrival order.

    def _receive_block_status(self, request, length):
        if (
            request.command != NBD_CMD_BLOCK_STATUS
            or length < STATUS_CONTEXT.size + EXTENT.size
            or (length - STATUS_CONTEXT.size) % EXTENT.size
            or length > _MAX_STATUS_CHUNK
        ):
            raise self._broken(f"{self.url}: invalid block status chunk of {length} bytes")
        payload = self._recv(length)
        (context_id,) = STATUS_CONTEXT.unpack_from(payload)
        name = self._context_names.get(context_id)
        if name is None:
            raise self._broken(f"{self.url}: block status for unknown context id {context_id}")
        extents = list(EXTENT.iter_unpack(memoryview(payload)[STATUS_CONTEXT.size :]))
        if min(extents)[0] == 0:
            raise self._broken(f"{self.url}: block status with an empty extent")
        request.extents.setdefault(name, []).extend(extents)

    def _receive_error(self, request, kind, length):
        if length < ERROR.size or length > _MAX_ERROR_CHUNK:
            raise self._broken(f"{self.url}: invalid error chunk of {length} bytes")
        payload = self._recv(length)
        error, message_length = ERROR.unpack_from(payload)
        end = ERROR.size + message_length
        if end > length or error == 0:
            raise self._broken(f"{self.url}: invalid error chunk")
        message = bytes(payload[ERROR.size : end]).decode("utf-8", "replace")
        error_offset = None
        if kind == NBD_REPLY_TYPE_ERROR_OFFSET:
            if length - end < ERROR_OFFSET.size:
                raise self._broken(f"{self.url}: error offset chunk without offset")
            (error_offset,) = ERROR_OFFSET.unpack_from(payload, end)
        self._request_failed(request, error, message, error_offset)

    def _request_failed(self, request, error, message, error_offset=None):
        if request.error is not None:
            return
        name, meaning = ERROR_NAMES.get(error, (f"error {error}", "unknown NBD error"))
        where = f" (error at offset {error_offset})" if error_offset is not None else ""
        detail = f": {message}" if message else ""
        command = COMMAND_NAMES.get(request.command, str(request.command))
        request.error = RequestError(
            f"{self.url}: {command} at offset {request.offset} length {request.length} "
            f"failed: {name} ({meaning}){where}{detail}",
            error,
            request.offset,
            request.length,
            error_offset,
        )
        if error == NBD_ESHUTDOWN:
            self._shutting_down = True

    def _complete(self, request):
        del self._inflight[request.cookie]
        request.done = True
        if (
            request.error is None
            and request.command == NBD_CMD_READ
            and request.received != request.length
        ):
            raise self._broken(
                f"{self.url}: read at offset {request.offset} length {request.length} "
                f"completed with {request.received} bytes"
            )
        operation = request.operation
        operation.pending -= 1
        if operation.error is None:
            operation.error = request.error
        if operation.flush_after and not operation.pending and operation.error is None:
            # A flush covers only the writes answered before it was received
            # (NBD_CMD_FLUSH in the protocol), so it waits for their replies.
            # The reply just received left room in flight for it.
            operation.flush_after = False
            self._send_request(operation, NBD_CMD_FLUSH, 0, 0, 0)

    def _inflight_request(self, cookie):
        request = self._inflight.get(cookie)
        if request is None:
            raise self._broken(f"{self.url}: reply for unknown cookie {cookie}")
        return request
