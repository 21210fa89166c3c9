# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Synchronous NBD client: the data path to qemu-nbd, nbdkit and any NBD server.

Protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
(its numbers in _nbd_wire, URLs in _nbd_url).

One Client is one connection and is not thread safe: parallel copies open one
client per worker (when the server sets NBD_FLAG_CAN_MULTI_CONN).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import ssl

from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import ZEROS, byte_view
from ansible_collections.thinair.ovirt.plugins.module_utils._nbd_handshake import (
    HandshakeMixin,
    reason,
)
from ansible_collections.thinair.ovirt.plugins.module_utils._nbd_replies import RepliesMixin
from ansible_collections.thinair.ovirt.plugins.module_utils._nbd_url import (
    Address,
    format_url,
    parse_url,
)
from ansible_collections.thinair.ovirt.plugins.module_utils._nbd_wire import (
    BASE_ALLOCATION,
    CHUNK,
    DEFAULT_MINIMUM_BLOCK_SIZE,
    DEFAULT_PREFERRED_BLOCK_SIZE,
    HOLE,
    MAX_PAYLOAD,
    MAX_STATUS_LENGTH,
    MAX_ZERO_LENGTH,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_ENOTSUP,
    NBD_EPERM,
    NBD_REQUEST_MAGIC,
    REQUEST,
    Error,
    OptionError,
    ProtocolError,
    RequestError,
    check_string,
)

# Requests sent before waiting for a reply. qemu-nbd serves 16 at a time; more
# only fill socket buffers, and bounding them means a server busy sending read
# replies never waits on a client that is still sending writes.
MAX_IN_FLIGHT = 16

# Forwarded data passes through a pipe of this size (the most an unprivileged
# process may ask for by default, /proc/sys/fs/pipe-max-size).
_PIPE_SIZE = 1024**2


# Connection states.
_HANDSHAKE = "handshake"
_READY = "ready"
_FAILED = "failed"
_CLOSED = "closed"


class Client(HandshakeMixin, RepliesMixin):
    """A connection to one NBD export.

    address: Address or NBD URL. export: overrides the URL's export name.
    tls_certs: directory with ca-cert.pem and optionally client-cert.pem and
    client-key.pem (qemu's names). TLS is used for nbds URLs or when tls_certs
    is given; the server's name is checked for TCP unless tls_hostname is "".
    meta_contexts: contexts to negotiate; those the server lacks are absent from
    ``contexts``. connect_timeout covers connecting and the handshake, timeout
    every later wait for the server (None: wait forever).
    """

    def __init__(
        self,
        address,
        export=None,
        tls_certs=None,
        tls_hostname=None,
        meta_contexts=(BASE_ALLOCATION,),
        connect_timeout=10.0,
        timeout=60.0,
    ):
        if not isinstance(address, Address):
            address = parse_url(address)
        if export is not None:
            address = address.with_export(export)
        if isinstance(meta_contexts, str):
            meta_contexts = (meta_contexts,)
        meta_contexts = tuple(meta_contexts)
        for name in meta_contexts:
            _check_meta_context(name)

        self.address = address
        self.url = format_url(address)
        self.export_size = 0
        self.transmission_flags = 0
        self.minimum_block_size = DEFAULT_MINIMUM_BLOCK_SIZE
        self.preferred_block_size = DEFAULT_PREFERRED_BLOCK_SIZE
        self.maximum_block_size = MAX_PAYLOAD
        self.structured_replies = False
        self.contexts = {}
        self.tls = bool(address.tls or tls_certs is not None)

        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._state = _HANDSHAKE
        self._failure = None
        self._sock = None
        self._pipe = None  # (read fd, write fd) that forwarded data passes through
        self._send_vectored = True
        self._tls_started = False
        self._client_certificate = False
        self._shutting_down = False
        self._context_names = {}
        self._next_cookie = 1
        self._inflight = {}  # cookie -> _Request sent, reply not complete
        self._operations = {}  # handle -> _Operation not yet waited for
        self._header = memoryview(bytearray(CHUNK.size))
        # Fixed-size chunk payloads (data offset, hole) are received here.
        self._payload = memoryview(bytearray(HOLE.size))

        tls_context = self._tls_context(tls_certs) if self.tls else None
        if tls_hostname is None:
            tls_hostname = address.host if address.transport == "tcp" else ""
        self._connect()
        try:
            self._handshake(tls_context, tls_hostname, meta_contexts)
        except OptionError:
            self._abort_handshake()
            raise
        except BaseException:
            self._close_socket()
            raise
        self._sock.settimeout(timeout)
        self._state = _READY

    # Blocking requests.

    def read(self, offset, length):
        """Read length bytes at offset into a new bytearray."""
        buf = bytearray(length)
        self.readinto(offset, buf)
        return buf

    def readinto(self, offset, buf):
        """Fill the writable buffer buf with the data at offset; returns its size in bytes."""
        handle = self.submit_read(offset, buf)
        self.wait(handle)
        return memoryview(buf).nbytes

    def write(self, offset, buf, fua=False):
        """Write buf at offset; with fua the data is on stable storage when this returns."""
        self.wait(self.submit_write(offset, buf, fua=fua))

    def zero(self, offset, length, punch_hole=True, fast=False):
        """Make length bytes at offset read as zeros.

        punch_hole=False asks the server to keep the range allocated (NO_HOLE).
        fast=True fails with RequestError ENOTSUP unless the server can zero
        faster than it writes (NBD_CMD_FLAG_FAST_ZERO).
        """
        self.wait(self._submit_zero(offset, length, punch_hole, fast))

    def trim(self, offset, length):
        """Tell the server the range is not needed; no-op if it cannot trim."""
        self._check_writable("trim", offset, length)
        if not self.can_trim:
            return
        handle, operation = self._new_operation()
        self._send_split(operation, NBD_CMD_TRIM, 0, offset, length, MAX_ZERO_LENGTH)
        self.wait(handle)

    def flush(self):
        """Put every completed write on stable storage; no-op if the server has no cache."""
        self._check_ready()
        if not self.can_flush:
            return
        handle, operation = self._new_operation()
        self._send_request(operation, NBD_CMD_FLUSH, 0, 0, 0)
        self.wait(handle)

    def extents(self, offset, length, contexts=None):
        """Query block status (one NBD_CMD_BLOCK_STATUS) from offset.

        Returns {context: [(length, flags), ...]} for the given contexts (default:
        all negotiated) as the server sent them: the extents may cover less than
        length, or run past it.
        """
        self._check_ready()
        if not self.contexts:
            raise RequestError(
                f"{self.url}: no metadata context was negotiated, cannot query extents",
                NBD_ENOTSUP,
                offset,
                length,
            )
        names = list(self.contexts) if contexts is None else list(contexts)
        for name in names:
            if name not in self.contexts:
                raise RequestError(
                    f"{self.url}: metadata context {name!r} was not negotiated; "
                    f"available: {', '.join(self.contexts)}",
                    NBD_ENOTSUP,
                    offset,
                    length,
                )
        _check_offset_length(offset, length)
        if length == 0 or offset >= self.export_size:
            raise RequestError(
                f"{self.url}: cannot query extents at offset {offset} length {length}: "
                f"outside the export ({self.export_size} bytes)",
                NBD_EINVAL,
                offset,
                length,
            )
        length = min(length, self.export_size - offset, MAX_STATUS_LENGTH)
        self._check_aligned("block status", offset, length)
        handle, operation = self._new_operation()
        request = self._send_request(operation, NBD_CMD_BLOCK_STATUS, 0, offset, length)
        self.wait(handle)
        result = {}
        for name in names:
            if name not in request.extents:
                raise self._broken(
                    f"{self.url}: the server sent no block status for {name!r} "
                    f"at offset {offset} length {length}"
                )
            result[name] = request.extents[name]
        return result

    # Pipelining: several requests in flight, replies in any order.

    def submit_read(self, offset, buf):
        """Send the read requests filling buf from offset; returns a handle for wait()."""
        view = byte_view(buf)
        if view.readonly:
            raise ValueError("read buffer must be writable")
        self._check_range("read", offset, len(view))
        handle, operation = self._new_operation()
        self._send_split(
            operation, NBD_CMD_READ, 0, offset, len(view), self.maximum_block_size, view
        )
        return handle

    def submit_write(self, offset, buf, fua=False):
        """Send buf to be written at offset; returns a handle for wait()."""
        view = byte_view(buf)
        self._check_writable("write", offset, len(view))
        flags = NBD_CMD_FLAG_FUA if fua and self.can_fua else 0
        handle, operation = self._new_operation()
        self._send_split(
            operation, NBD_CMD_WRITE, flags, offset, len(view), self.maximum_block_size, view
        )
        # No FUA on this server: once the writes are answered, a flush makes
        # them stable and completes the same handle.
        operation.flush_after = fua and not self.can_fua and self.can_flush
        return handle

    def submit_zero(self, offset, length, punch_hole=True):
        """Send the requests zeroing length bytes at offset; returns a handle for wait()."""
        return self._submit_zero(offset, length, punch_hole, False)

    def can_forward_to(self, sink):
        """Whether submit_forward can move data from this export to sink: both
        connections are plain sockets (splice(2) cannot see through TLS)."""
        return (
            hasattr(os, "splice")
            and sink is not self
            and not self.tls
            and not sink.tls
            and self._state == _READY
            and sink._state == _READY
        )

    def submit_forward(self, offset, length, sink, request_size=None):
        """Copy length bytes at offset to the same offset of sink, another
        client, without the data entering this process: each read reply's
        payload is spliced from this socket through a pipe into a write on
        sink's socket, holes become zero requests there.

        Returns (handle, sink handle): wait(handle) reads and forwards the
        replies; then sink.wait(sink handle) waits for sink's answers.
        """
        if not self.can_forward_to(sink):
            raise ValueError(f"cannot forward from {self.url} to {sink.url}")
        self._check_range("read", offset, length)
        sink._check_writable("write", offset, length)
        step = min(self.maximum_block_size, sink.maximum_block_size)
        if request_size is not None:
            step = min(step, request_size)
        handle, operation = self._new_operation()
        sink_handle, sink_operation = sink._new_operation()
        for pos in range(0, length, step):
            size = min(step, length - pos)
            request = self._send_request(operation, NBD_CMD_READ, 0, offset + pos, size)
            request.sink = (sink, sink_operation)
        return handle, sink_handle

    def wait(self, handle):
        """Read replies until the requests of handle complete; raise its first error."""
        operation = self._operations.get(handle)
        if operation is None:
            self._check_ready()
            raise ValueError(f"unknown or already completed handle {handle!r}")
        while operation.pending:
            self._receive_reply()
        del self._operations[handle]
        if operation.error is not None:
            raise operation.error

    def wait_all(self):
        """Wait for every submitted request; raise the first error among them."""
        while self._inflight:
            self._receive_reply()
        self._check_ready()
        error = None
        for operation in self._operations.values():
            if error is None:
                error = operation.error
        self._operations.clear()
        if error is not None:
            raise error

    # Closing.

    def close(self):
        """Finish requests in flight, send NBD_CMD_DISC and close; idempotent."""
        if self._sock is None:
            self._state = _CLOSED
            return
        try:
            if self._state == _READY:
                while self._inflight:
                    self._receive_reply()
                self._send(REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0))
        except Error:
            pass
        finally:
            self._close_socket()
            self._state = _CLOSED

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return f"<nbd.Client {self.url} {self._state}>"

    # Transmission (receiving replies: _nbd_replies).

    def _submit_zero(self, offset, length, punch_hole, fast):
        self._check_writable("zero", offset, length)
        if fast and not self.can_fast_zero:
            raise RequestError(
                f"{self.url}: the server cannot zero fast (no NBD_FLAG_SEND_FAST_ZERO)",
                NBD_ENOTSUP,
                offset,
                length,
            )
        handle, operation = self._new_operation()
        flags = 0 if punch_hole else NBD_CMD_FLAG_NO_HOLE
        if fast:
            flags |= NBD_CMD_FLAG_FAST_ZERO
        self._send_zero(operation, flags, offset, length)
        return handle

    def _send_zero(self, operation, flags, offset, length):
        if self.can_zero:
            self._send_split(
                operation, NBD_CMD_WRITE_ZEROES, flags, offset, length, MAX_ZERO_LENGTH
            )
            return
        # Without NBD_CMD_WRITE_ZEROES, zeros are written as data.
        step = min(len(ZEROS), self.maximum_block_size)
        for pos in range(0, length, step):
            size = min(step, length - pos)
            self._send_request(operation, NBD_CMD_WRITE, 0, offset + pos, size, ZEROS[:size])

    def _new_operation(self):
        """A handle and the operation that its requests complete."""
        self._check_ready()
        if self._shutting_down:
            raise ProtocolError(f"{self.url}: the server is shutting down")
        handle = self._next_cookie
        self._next_cookie += 1
        operation = _Operation()
        self._operations[handle] = operation
        return handle, operation

    def _send_split(self, operation, command, flags, offset, length, step, view=None):
        """Send requests of at most step bytes covering length bytes at offset."""
        for pos in range(0, length, step):
            size = min(step, length - pos)
            part = view[pos : pos + size] if view is not None else None
            self._send_request(operation, command, flags, offset + pos, size, part)

    def _send_request(self, operation, command, flags, offset, length, view=None, source=None):
        """Send one request; a write's payload is view, or the next length
        bytes of the client source's socket (a forwarded read's data)."""
        while len(self._inflight) >= MAX_IN_FLIGHT:
            self._receive_reply()
        cookie = self._next_cookie
        self._next_cookie += 1
        request = _Request(cookie, command, offset, length, view, operation)
        operation.requests.append(request)
        operation.pending += 1
        self._inflight[cookie] = request
        header = REQUEST.pack(NBD_REQUEST_MAGIC, flags, command, cookie, offset, length)
        if command != NBD_CMD_WRITE:
            self._send(header)
        elif source is not None:
            self._send(header)
            self._splice_from(source, length)
        else:
            self._send(header, view)
        return request

    def _splice_from(self, source, size):
        """Move size bytes from source's socket into this one through a pipe.
        A failure on either side leaves both connections out of step."""
        try:
            _splice(source._sock, self._sock, self._forward_pipe(), size, self._timeout)
        except OSError as e:
            message = f"forwarding data from {source.url} to {self.url} failed: {reason(e)}"
            source._broken(message)
            raise self._broken(message) from e
        except BaseException:
            source._broken(f"{source.url}: interrupted while forwarding")
            self._broken(f"{self.url}: interrupted while forwarding")
            raise

    def _forward_pipe(self):
        if self._pipe is None:
            self._pipe = os.pipe()
            # A smaller pipe only means more system calls.
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._pipe[1], fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        return self._pipe

    # Checks before sending.

    def _check_ready(self):
        if self._state == _READY:
            return
        if self._state == _FAILED:
            raise ProtocolError(f"connection is dead: {self._failure}")
        raise ProtocolError(f"{self.url}: the client is closed")

    def _check_range(self, what, offset, length):
        self._check_ready()
        _check_offset_length(offset, length)
        if offset + length > self.export_size:
            raise RequestError(
                f"{self.url}: cannot {what} at offset {offset} length {length}: "
                f"past the end of the export ({self.export_size} bytes)",
                NBD_EINVAL,
                offset,
                length,
            )
        self._check_aligned(what, offset, length)

    def _check_aligned(self, what, offset, length):
        block = self.minimum_block_size
        end = offset + length
        if offset % block or (end % block and end != self.export_size):
            raise RequestError(
                f"{self.url}: cannot {what} at offset {offset} length {length}: not aligned "
                f"to the server's minimum block size ({block} bytes)",
                NBD_EINVAL,
                offset,
                length,
            )

    def _check_writable(self, what, offset, length):
        self._check_range(what, offset, length)
        if self.is_read_only:
            raise RequestError(
                f"{self.url}: cannot {what}: the export is read-only",
                NBD_EPERM,
                offset,
                length,
            )

    # Socket I/O. Any failure here kills the connection.

    def _recv(self, length, closed_message=None):
        buf = bytearray(length)
        self._recv_into(memoryview(buf), closed_message)
        return buf

    def _recv_into(self, view, closed_message=None):
        sock = self._sock
        pos = 0
        size = len(view)
        try:
            while pos < size:
                n = sock.recv_into(view[pos:])
                if n == 0:
                    raise self._broken(closed_message or self._closed_message())
                pos += n
        except OSError as e:
            raise self._broken(self._io_message(e)) from e
        except BaseException:
            # Interrupted in the middle of a message: the stream is out of step.
            self._broken(f"{self.url}: interrupted while receiving")
            raise

    def _send(self, header, payload=None):
        sock = self._sock
        try:
            if payload is None:
                sock.sendall(header)
            elif self._send_vectored:
                # One system call for header and payload, without joining them.
                sent = sock.sendmsg([header, payload])
                if sent < len(header):
                    sock.sendall(header[sent:])
                    sent = len(header)
                if sent - len(header) < len(payload):
                    sock.sendall(payload[sent - len(header) :])
            else:
                sock.sendall(header)
                sock.sendall(payload)
        except OSError as e:
            raise self._broken(self._io_message(e)) from e
        except BaseException:
            self._broken(f"{self.url}: interrupted while sending")
            raise

    def _closed_message(self):
        if self._state == _HANDSHAKE:
            return (
                f"{self.url}: the server closed the connection during the handshake"
                f"{self._tls_hint()}"
            )
        return f"{self.url}: the server closed the connection"

    def _io_message(self, e):
        during = " during the handshake" if self._state == _HANDSHAKE else ""
        if isinstance(e, socket.timeout):
            timeout = self._connect_timeout if self._state == _HANDSHAKE else self._timeout
            return f"{self.url}: timed out after {timeout:g} seconds waiting for the server{during}"
        if isinstance(e, ssl.SSLError):
            return f"{self.url}: TLS error{during}: {reason(e)}{self._tls_hint()}"
        return f"{self.url}: connection lost{during}{self._tls_hint()}: {reason(e)}"

    def _tls_hint(self):
        # With TLS 1.3 a server rejecting the client's certificate does so
        # after the client finished its side of the TLS handshake: the client
        # learns of it as an alert or a closed connection on the next read.
        if self._state != _HANDSHAKE or not self._tls_started:
            return ""
        if self._client_certificate:
            return " (did the server reject the client certificate?)"
        return (
            " (does the server want a client certificate? put client-cert.pem and "
            "client-key.pem in tls_certs)"
        )

    def _broken(self, message):
        """A ProtocolError for message; the connection is unusable from now on."""
        error = ProtocolError(message)
        if self._state == _READY:
            self._state = _FAILED
            self._failure = error
            self._close_socket()
        return error

    def _close_socket(self):
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])


class _Operation:
    """What one handle waits for: one or more requests."""

    __slots__ = ("error", "flush_after", "pending", "requests")

    def __init__(self):
        self.requests = []
        self.pending = 0
        self.error = None
        self.flush_after = False


class _Request:
    """One request on the wire, identified by its cookie."""

    __slots__ = (
        "command",
        "cookie",
        "done",
        "error",
        "extents",
        "length",
        "offset",
        "operation",
        "received",
        "sink",
        "view",
    )

    def __init__(self, cookie, command, offset, length, view, operation):
        self.cookie = cookie
        self.command = command
        self.offset = offset
        self.length = length
        self.view = view
        self.operation = operation
        self.received = 0
        self.sink = None  # (client, operation) that forwarded read data is written to
        self.extents = {}
        self.error = None
        self.done = False


def _splice(src, dst, pipe, size, timeout):
    """Move size bytes from socket src to socket dst through pipe (empty
    before and after). The sockets are non-blocking (they have timeouts):
    each waits in poll for at most timeout seconds (None: forever)."""
    pipe_r, pipe_w = pipe
    src_fd, dst_fd = src.fileno(), dst.fileno()
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    wait_ms = None if timeout is None else int(timeout * 1000)
    left = size  # still in src
    held = 0  # in the pipe
    while left or held:
        moved = False
        if left and held < _PIPE_SIZE:
            try:
                n = os.splice(src_fd, pipe_w, min(left, _PIPE_SIZE - held), flags=flags)
            except BlockingIOError:
                n = None
            if n == 0:
                raise ConnectionResetError("the source closed the connection")
            if n:
                left -= n
                held += n
                moved = True
        if held:
            try:
                n = os.splice(pipe_r, dst_fd, held, flags=flags)
            except BlockingIOError:
                n = None
            if n:
                held -= n
                moved = True
        if not moved:
            poller = select.poll()
            if left and held < _PIPE_SIZE:
                poller.register(src_fd, select.POLLIN)
            if held:
                poller.register(dst_fd, select.POLLOUT)
            if not poller.poll(wait_ms):
                raise socket.timeout(f"timed out after {timeout:g} seconds forwarding data")


def _check_meta_context(name):
    check_string("metadata context", name)
    namespace, sep, leaf = name.partition(":")
    if not sep or not namespace or not leaf:
        raise ValueError(
            f"invalid metadata context {name!r}: expected NAMESPACE:NAME, e.g. {BASE_ALLOCATION!r}"
        )


def _check_offset_length(offset, length):
    if offset < 0 or length < 0:
        raise ValueError(f"invalid offset {offset} or length {length}")
