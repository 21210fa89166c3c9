# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Synchronous NBD client: the data path to qemu-nbd, nbdkit and any NBD server.

Protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
URLs:     https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md
qemu meta contexts: https://www.qemu.org/docs/master/interop/nbd.html

One Client is one connection and is not thread safe: parallel copies open one
client per worker (when the server sets NBD_FLAG_CAN_MULTI_CONN).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import struct
from urllib.parse import quote, unquote, urlsplit

# Magic numbers, proto.md "Newstyle negotiation", "Fixed newstyle negotiation",
# "Request message", "Simple reply message", "Structured reply chunk message".
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first word of every greeting
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle greeting and option requests
CLISERV_MAGIC = 0x00420281861253  # oldstyle greeting
NBD_REP_MAGIC = 0x3E889045565A9  # option replies
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

NBD_DEFAULT_PORT = 10809  # IANA

# Handshake flags (server), proto.md "Handshake flags".
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1

# Client flags, proto.md "Client flags".
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# Option types, proto.md "Option types".
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_STARTTLS = 5
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_SET_META_CONTEXT = 10

# Option reply types, proto.md "Option reply types". Errors have bit 31 set.
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9

# Information types in NBD_REP_INFO, proto.md "NBD_REP_INFO".
NBD_INFO_EXPORT = 0
NBD_INFO_BLOCK_SIZE = 3

# Transmission flags, proto.md "Transmission flags".
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# Request types, proto.md "Request types".
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

# Command flags, proto.md "Command flags".
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply flags and types, proto.md "Structured reply flags/types".
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR_BIT = 1 << 15
NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_ERROR_BIT | 1
NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_ERROR_BIT | 2

# Error values, proto.md "Error values".
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# Metadata contexts, proto.md "Metadata querying" and qemu's interop/nbd.rst.
BASE_ALLOCATION = "base:allocation"
QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"  # extent flags = depth, 0 = unallocated
QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"  # followed by the bitmap name
NBD_STATE_HOLE = 1 << 0  # base:allocation
NBD_STATE_ZERO = 1 << 1  # base:allocation
NBD_STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:NAME

# proto.md "Size constraints": defaults when the server sends no block sizes,
# and the largest payload any server must accept without calling it abuse.
DEFAULT_MINIMUM_BLOCK_SIZE = 1
DEFAULT_PREFERRED_BLOCK_SIZE = 4096
MAX_PAYLOAD = 32 * 1024**2

# Strings (export names, contexts, messages) are limited to 4096 bytes.
MAX_STRING = 4096

# Requests without payload (zero, trim) carry a 32-bit length; 1 GiB pieces
# stay aligned to any minimum block size and far below servers' limits.
MAX_ZERO_LENGTH = 1 << 30

# Block status lengths are 32-bit too; this value is aligned to 64 KiB, the
# largest minimum block size a server may advertise.
MAX_STATUS_LENGTH = (1 << 32) - (1 << 16)

# Requests sent before waiting for a reply. qemu-nbd serves 16 at a time; more
# only fill socket buffers, and bounding them means a server busy sending read
# replies never waits on a client that is still sending writes.
MAX_IN_FLIGHT = 16

# Seconds to wait for the server to acknowledge NBD_OPT_ABORT.
_ABORT_TIMEOUT = 1.0

# Option replies and error chunks are small; anything larger is a broken server.
_MAX_OPTION_REPLY = 64 * 1024
_MAX_ERROR_CHUNK = 64 * 1024
# A block status chunk should hold at most 2**20 extents; allow twice that.
_MAX_STATUS_CHUNK = 4 + 8 * (1 << 21)

_ERROR_NAMES = {
    NBD_EPERM: ("EPERM", "operation not permitted"),
    NBD_EIO: ("EIO", "input/output error"),
    NBD_ENOMEM: ("ENOMEM", "cannot allocate memory"),
    NBD_EINVAL: ("EINVAL", "invalid argument"),
    NBD_ENOSPC: ("ENOSPC", "no space left on device"),
    NBD_EOVERFLOW: ("EOVERFLOW", "value too large"),
    NBD_ENOTSUP: ("ENOTSUP", "operation not supported"),
    NBD_ESHUTDOWN: ("ESHUTDOWN", "server is shutting down"),
}

_OPTION_NAMES = {
    NBD_OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    NBD_OPT_ABORT: "NBD_OPT_ABORT",
    NBD_OPT_STARTTLS: "NBD_OPT_STARTTLS",
    NBD_OPT_GO: "NBD_OPT_GO",
    NBD_OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    NBD_OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}

_REPLY_ERRORS = {
    NBD_REP_ERR_UNSUP: ("NBD_REP_ERR_UNSUP", "option not supported"),
    NBD_REP_ERR_POLICY: ("NBD_REP_ERR_POLICY", "forbidden by server policy"),
    NBD_REP_ERR_INVALID: ("NBD_REP_ERR_INVALID", "invalid request"),
    NBD_REP_ERR_PLATFORM: ("NBD_REP_ERR_PLATFORM", "not supported on the server's platform"),
    NBD_REP_ERR_TLS_REQD: ("NBD_REP_ERR_TLS_REQD", "TLS required"),
    NBD_REP_ERR_UNKNOWN: ("NBD_REP_ERR_UNKNOWN", "export not available"),
    NBD_REP_ERR_SHUTDOWN: ("NBD_REP_ERR_SHUTDOWN", "server is shutting down"),
    NBD_REP_ERR_BLOCK_SIZE_REQD: ("NBD_REP_ERR_BLOCK_SIZE_REQD", "block sizes required"),
    NBD_REP_ERR_TOO_BIG: ("NBD_REP_ERR_TOO_BIG", "request or reply too big"),
}

_COMMAND_NAMES = {
    NBD_CMD_READ: "read",
    NBD_CMD_WRITE: "write",
    NBD_CMD_FLUSH: "flush",
    NBD_CMD_TRIM: "trim",
    NBD_CMD_WRITE_ZEROES: "zero",
    NBD_CMD_BLOCK_STATUS: "block status",
}

# Wire layouts, all big endian.
# S: NBDMAGIC (64) | IHAVEOPT or CLISERV_MAGIC (64)
_GREETING = struct.Struct(">QQ")
# S: handshake flags (16)
_HANDSHAKE_FLAGS = struct.Struct(">H")
# C: client flags (32)
_CLIENT_FLAGS = struct.Struct(">I")
# C: IHAVEOPT (64) | option (32) | data length (32) | data
_OPTION = struct.Struct(">QII")
# S: NBD_REP_MAGIC (64) | option (32) | reply type (32) | data length (32) | data
_OPTION_REPLY = struct.Struct(">QIII")
# Length of a string in option data (32), or a count of queries (32)
_UINT32 = struct.Struct(">I")
# Number of information requests (16), each an information type (16)
_UINT16 = struct.Struct(">H")
# NBD_REP_INFO data: information type (16) | information
_INFO_TYPE = struct.Struct(">H")
# NBD_INFO_EXPORT: type (16) | export size (64) | transmission flags (16)
_INFO_EXPORT = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE: type (16) | minimum (32) | preferred (32) | maximum payload (32)
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
# NBD_REP_META_CONTEXT data: context id (32) | name
_META_CONTEXT = struct.Struct(">I")
# NBD_OPT_EXPORT_NAME reply: export size (64) | transmission flags (16) | [124 zero bytes]
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_EXPORT_NAME_PADDING = 124
# C: magic (32) | command flags (16) | type (16) | cookie (64) | offset (64) | length (32)
_REQUEST = struct.Struct(">IHHQQI")
# S: magic (32) | error (32) | cookie (64)
_SIMPLE_REPLY = struct.Struct(">IIQ")
# S: magic (32) | flags (16) | type (16) | cookie (64) | payload length (32)
_CHUNK = struct.Struct(">IHHQI")
# First word of any reply: magic (32)
_MAGIC = struct.Struct(">I")
# NBD_REPLY_TYPE_OFFSET_DATA payload: offset (64) | data
_DATA_OFFSET = struct.Struct(">Q")
# NBD_REPLY_TYPE_OFFSET_HOLE payload: offset (64) | hole size (32)
_HOLE = struct.Struct(">QI")
# NBD_REPLY_TYPE_BLOCK_STATUS payload: context id (32) | descriptors
_STATUS_CONTEXT = struct.Struct(">I")
# Block status descriptor: extent length (32) | status flags (32)
_EXTENT = struct.Struct(">II")
# Error chunk payload: error (32) | message length (16) | message | [offset (64)]
_ERROR = struct.Struct(">IH")
_ERROR_OFFSET = struct.Struct(">Q")

# Holes in read replies are filled from this block of zeros.
_ZEROS = memoryview(bytes(1024**2))

_SCHEMES = {
    "nbd": ("tcp", False),
    "nbds": ("tcp", True),
    "nbd+unix": ("unix", False),
    "nbds+unix": ("unix", True),
}

# Connection states.
_HANDSHAKE = "handshake"
_READY = "ready"
_FAILED = "failed"
_CLOSED = "closed"


class Error(Exception):
    """Base of every error raised by this module."""


class ProtocolError(Error):
    """The connection is dead: it cannot be used any more."""


class OptionError(ProtocolError):
    """The server refused an option during the handshake.

    ``option`` is the NBD_OPT_* sent and ``reply_type`` the NBD_REP_ERR_* received.
    """

    def __init__(self, message, option, reply_type):
        super().__init__(message)
        self.option = option
        self.reply_type = reply_type


class RequestError(Error):
    """One request failed; the connection is still usable.

    ``errno`` is the NBD error value (NBD_EIO, ...), ``offset`` and ``length``
    the failed request, ``error_offset`` where the server located the error
    (NBD_REPLY_TYPE_ERROR_OFFSET) or None.
    """

    def __init__(self, message, errno, offset, length, error_offset=None):
        super().__init__(message)
        self.errno = errno
        self.offset = offset
        self.length = length
        self.error_offset = error_offset


@dataclasses.dataclass(frozen=True)
class Address:
    """Where an NBD export lives; str() gives the canonical URL."""

    transport: str  # "tcp" or "unix"
    host: str | None = None
    port: int | None = None
    path: str | None = None  # unix socket path
    export: str = ""
    tls: bool = False

    def __post_init__(self):
        if self.transport == "tcp":
            if not self.host or not isinstance(self.port, int) or self.path is not None:
                raise ValueError(f"a tcp address needs host and port, and no path: {self!r}")
            if not 0 < self.port < 65536:
                raise ValueError(f"port {self.port} out of range 1-65535")
        elif self.transport == "unix":
            if not self.path or self.host is not None or self.port is not None:
                raise ValueError(f"a unix address needs a socket path, and no host: {self!r}")
        else:
            raise ValueError(f"transport must be 'tcp' or 'unix', not {self.transport!r}")
        _check_string("export name", self.export)

    def __str__(self):
        return format_url(self)

    def with_export(self, export):
        """The same server with another export name."""
        return dataclasses.replace(self, export=export)


def parse_url(url):
    """Parse an NBD URL into an Address.

    Accepts nbd://host[:port][/export], nbds://..., nbd+unix:///export?socket=PATH,
    nbds+unix:///export?socket=PATH and qemu's legacy nbd:HOST:PORT[:exportname=X]
    and nbd:unix:PATH[:exportname=X]. Raises ValueError naming the URL and the problem.
    """
    if not isinstance(url, str):
        raise ValueError(f"NBD URL must be a string, not {type(url).__name__}: {url!r}")
    if url.startswith("nbd:") and not url.startswith("nbd://"):
        return _parse_legacy_url(url)

    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ValueError(
            f"invalid NBD URL {url!r}: contains white space or control characters; "
            f"percent-encode them (a space is %20)"
        )
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"invalid NBD URL {url!r}: {e}") from None
    if parts.scheme not in _SCHEMES:
        raise ValueError(
            f"invalid NBD URL {url!r}: unsupported scheme {parts.scheme!r}; use nbd://, nbds://, "
            f"nbd+unix://, nbds+unix:// or nbd:unix:PATH"
        )
    transport, tls = _SCHEMES[parts.scheme]
    if parts.fragment:
        raise ValueError(f"invalid NBD URL {url!r}: unexpected fragment #{parts.fragment}")
    if "@" in parts.netloc:
        raise ValueError(f"invalid NBD URL {url!r}: user names are not supported")
    export = _url_export(url, parts.path)
    params = _url_query(url, parts.query)

    if transport == "tcp":
        if params:
            raise ValueError(
                f"invalid NBD URL {url!r}: unsupported query parameter {next(iter(params))!r}"
            )
        if not parts.netloc:
            raise ValueError(f"invalid NBD URL {url!r}: missing host")
        host, port = _split_host_port(url, parts.netloc, NBD_DEFAULT_PORT)
        return Address("tcp", host=host, port=port, export=export, tls=tls)

    if parts.netloc:
        raise ValueError(
            f"invalid NBD URL {url!r}: a {parts.scheme} URL names no host; "
            f"use {parts.scheme}:///EXPORT?socket=PATH"
        )
    path = params.pop("socket", None)
    if params:
        raise ValueError(
            f"invalid NBD URL {url!r}: unsupported query parameter {next(iter(params))!r}"
        )
    if not path:
        raise ValueError(
            f"invalid NBD URL {url!r}: missing socket path; "
            f"use {parts.scheme}:///EXPORT?socket=PATH"
        )
    return Address("unix", path=path, export=export, tls=tls)


def format_url(address):
    """The canonical URL of an Address (or of an NBD URL in any accepted form)."""
    if isinstance(address, str):
        address = parse_url(address)
    scheme = "nbds" if address.tls else "nbd"
    export = quote(address.export, safe="/")
    if address.transport == "tcp":
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"{scheme}://{host}:{address.port}/{export}"
    return f"{scheme}+unix:///{export}?socket={quote(address.path, safe='/')}"


class Client:
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
        self._send_vectored = True
        self._tls_started = False
        self._client_certificate = False
        self._shutting_down = False
        self._context_names = {}
        self._next_cookie = 1
        self._inflight = {}  # cookie -> _Request sent, reply not complete
        self._operations = {}  # handle -> _Operation not yet waited for
        self._header = memoryview(bytearray(_CHUNK.size))
        # Fixed-size chunk payloads (data offset, hole) are received here.
        self._payload = memoryview(bytearray(_HOLE.size))

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

    # Export properties, from the transmission flags.

    @property
    def is_read_only(self):
        return bool(self.transmission_flags & NBD_FLAG_READ_ONLY)

    @property
    def can_flush(self):
        return bool(self.transmission_flags & NBD_FLAG_SEND_FLUSH)

    @property
    def can_fua(self):
        return bool(self.transmission_flags & NBD_FLAG_SEND_FUA)

    @property
    def can_trim(self):
        return bool(self.transmission_flags & NBD_FLAG_SEND_TRIM)

    @property
    def can_zero(self):
        return bool(self.transmission_flags & NBD_FLAG_SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self):
        return self.can_zero and bool(self.transmission_flags & NBD_FLAG_SEND_FAST_ZERO)

    @property
    def can_multi_conn(self):
        return bool(self.transmission_flags & NBD_FLAG_CAN_MULTI_CONN)

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
        view = _byte_view(buf)
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
        view = _byte_view(buf)
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
                self._send(_REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0))
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

    # Connection set-up.

    def _tls_context(self, certs_dir):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if certs_dir is None:
            context.load_default_certs()
            return context
        ca_file = os.path.join(certs_dir, "ca-cert.pem")
        cert_file = os.path.join(certs_dir, "client-cert.pem")
        key_file = os.path.join(certs_dir, "client-key.pem")
        if not os.path.isfile(ca_file):
            raise Error(
                f"{self.url}: TLS certificate directory {certs_dir!r} has no ca-cert.pem "
                f"(the CA that signed the server's certificate)"
            )
        has_cert, has_key = os.path.isfile(cert_file), os.path.isfile(key_file)
        if has_cert != has_key:
            missing = "client-key.pem" if has_cert else "client-cert.pem"
            raise Error(
                f"{self.url}: TLS certificate directory {certs_dir!r} has only half of the "
                f"client certificate: {missing} is missing"
            )
        try:
            context.load_verify_locations(cafile=ca_file)
            if has_cert:
                context.load_cert_chain(cert_file, key_file)
                self._client_certificate = True
        except (OSError, ssl.SSLError) as e:
            raise Error(f"{self.url}: cannot load TLS certificates from {certs_dir!r}: {e}") from e
        return context

    def _connect(self):
        address = self.address
        try:
            if address.transport == "tcp":
                sock = socket.create_connection(
                    (address.host, address.port), timeout=self._connect_timeout
                )
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self._connect_timeout)
                    sock.connect(address.path)
                except BaseException:
                    sock.close()
                    raise
        except OSError as e:
            raise ProtocolError(f"cannot connect to {self.url}: {_reason(e)}") from e
        self._sock = sock

    def _handshake(self, tls_context, tls_hostname, meta_contexts):
        magic, version = _GREETING.unpack(self._recv(_GREETING.size))
        if magic != NBDMAGIC:
            raise self._broken(f"{self.url} is not an NBD server (bad greeting 0x{magic:x})")
        if version == CLISERV_MAGIC:
            raise self._broken(
                f"{self.url} uses the oldstyle NBD handshake, which is not supported; "
                f"run the server in newstyle mode"
            )
        if version != IHAVEOPT:
            raise self._broken(f"{self.url}: unknown NBD handshake 0x{version:x}")
        (server_flags,) = _HANDSHAKE_FLAGS.unpack(self._recv(_HANDSHAKE_FLAGS.size))
        fixed = bool(server_flags & NBD_FLAG_FIXED_NEWSTYLE)
        no_zeroes = bool(server_flags & NBD_FLAG_NO_ZEROES)
        client_flags = (NBD_FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (
            NBD_FLAG_C_NO_ZEROES if no_zeroes else 0
        )
        self._send(_CLIENT_FLAGS.pack(client_flags))

        if not fixed:
            # Plain newstyle servers understand NBD_OPT_EXPORT_NAME only.
            if tls_context is not None:
                raise self._broken(
                    f"{self.url}: the server does not support fixed newstyle negotiation, "
                    f"so it cannot start TLS"
                )
            self._export_name(no_zeroes)
            return

        if tls_context is not None:
            self._start_tls(tls_context, tls_hostname)
        self.structured_replies = self._negotiate_structured_replies()
        if self.structured_replies and meta_contexts:
            self._negotiate_meta_contexts(meta_contexts)
        if not self._go():
            self._export_name(no_zeroes)

    def _start_tls(self, context, hostname):
        reply, data = self._option(NBD_OPT_STARTTLS)
        if reply != NBD_REP_ACK:
            if reply & NBD_REP_FLAG_ERROR:
                name = _reply_error_name(reply)[0]
                message = _option_message(data)
                raise OptionError(
                    f"{self.url}: the server refused TLS ({name}{message}); "
                    f"it serves plain NBD: use an nbd:// or nbd+unix:// URL without tls_certs",
                    NBD_OPT_STARTTLS,
                    reply,
                )
            raise self._unexpected_reply(NBD_OPT_STARTTLS, reply)
        context.check_hostname = bool(hostname)
        try:
            self._sock = context.wrap_socket(self._sock, server_hostname=hostname or None)
        except ssl.SSLCertVerificationError as e:
            raise ProtocolError(
                f"{self.url}: TLS handshake failed: certificate verify failed: {e.verify_message}"
            ) from e
        except OSError as e:
            raise ProtocolError(f"{self.url}: TLS handshake failed: {_reason(e)}") from e
        self._send_vectored = False
        self._tls_started = True

    def _negotiate_structured_replies(self):
        reply, data = self._option(NBD_OPT_STRUCTURED_REPLY)
        if reply == NBD_REP_ACK:
            return True
        if reply in (NBD_REP_ERR_UNSUP, NBD_REP_ERR_POLICY, NBD_REP_ERR_INVALID):
            return False
        raise self._option_failed(NBD_OPT_STRUCTURED_REPLY, reply, data)

    def _negotiate_meta_contexts(self, names):
        export = self.address.export.encode("utf-8")
        parts = [_UINT32.pack(len(export)), export, _UINT32.pack(len(names))]
        for name in names:
            encoded = name.encode("utf-8")
            parts += [_UINT32.pack(len(encoded)), encoded]
        self._send_option(NBD_OPT_SET_META_CONTEXT, b"".join(parts))
        contexts = {}
        while True:
            reply, data = self._option_reply(NBD_OPT_SET_META_CONTEXT)
            if reply == NBD_REP_META_CONTEXT:
                if len(data) <= _META_CONTEXT.size:
                    raise self._broken(f"{self.url}: invalid NBD_REP_META_CONTEXT reply")
                (context_id,) = _META_CONTEXT.unpack_from(data)
                name = bytes(data[_META_CONTEXT.size :]).decode("utf-8", "replace")
                contexts[name] = context_id
            elif reply == NBD_REP_ACK:
                break
            elif reply in (
                NBD_REP_ERR_UNSUP,
                NBD_REP_ERR_POLICY,
                NBD_REP_ERR_INVALID,
                NBD_REP_ERR_PLATFORM,
                NBD_REP_ERR_TOO_BIG,
            ):
                # No metadata for this connection; reads and writes still work.
                return
            else:
                raise self._option_failed(NBD_OPT_SET_META_CONTEXT, reply, data)
        self.contexts = contexts
        self._context_names = {context_id: name for name, context_id in contexts.items()}

    def _go(self):
        """Select the export with NBD_OPT_GO; False if the server lacks the option."""
        export = self.address.export.encode("utf-8")
        data = b"".join(
            [
                _UINT32.pack(len(export)),
                export,
                _UINT16.pack(1),
                _UINT16.pack(NBD_INFO_BLOCK_SIZE),
            ]
        )
        self._send_option(NBD_OPT_GO, data)
        have_export = False
        block_sizes = None
        while True:
            reply, data = self._option_reply(NBD_OPT_GO)
            if reply == NBD_REP_INFO:
                if len(data) < _INFO_TYPE.size:
                    raise self._broken(f"{self.url}: invalid NBD_REP_INFO reply")
                (info,) = _INFO_TYPE.unpack_from(data)
                if info == NBD_INFO_EXPORT:
                    if len(data) != _INFO_EXPORT.size:
                        raise self._broken(f"{self.url}: invalid NBD_INFO_EXPORT reply")
                    size, flags = _INFO_EXPORT.unpack(data)[1:]
                    have_export = True
                elif info == NBD_INFO_BLOCK_SIZE:
                    if len(data) != _INFO_BLOCK_SIZE.size:
                        raise self._broken(f"{self.url}: invalid NBD_INFO_BLOCK_SIZE reply")
                    block_sizes = _INFO_BLOCK_SIZE.unpack(data)[1:]
            elif reply == NBD_REP_ACK:
                break
            elif reply == NBD_REP_ERR_UNSUP:
                return False
            else:
                raise self._option_failed(NBD_OPT_GO, reply, data)
        if not have_export:
            raise self._broken(f"{self.url}: the server accepted the export without its size")
        self._set_export(size, flags)
        if block_sizes is not None:
            self._set_block_sizes(*block_sizes)
        return True

    def _export_name(self, no_zeroes):
        """Select the export with NBD_OPT_EXPORT_NAME, which has no error reply."""
        self._send_option(NBD_OPT_EXPORT_NAME, self.address.export.encode("utf-8"))
        closed = (
            f"{self.url}: the server closed the connection after NBD_OPT_EXPORT_NAME; "
            f"export {self.address.export!r} was not found or needs TLS"
        )
        size, flags = _EXPORT_NAME_REPLY.unpack(self._recv(_EXPORT_NAME_REPLY.size, closed))
        if not no_zeroes:
            self._recv(_EXPORT_NAME_PADDING)
        self._set_export(size, flags)

    def _set_export(self, size, flags):
        self.export_size = size
        self.transmission_flags = flags

    def _set_block_sizes(self, minimum, preferred, maximum):
        if minimum < 1 or minimum & (minimum - 1) or minimum > 64 * 1024:
            raise self._broken(f"{self.url}: invalid minimum block size {minimum}")
        if preferred < minimum or maximum < minimum:
            raise self._broken(
                f"{self.url}: invalid block sizes minimum={minimum} preferred={preferred} "
                f"maximum={maximum}"
            )
        self.minimum_block_size = minimum
        self.preferred_block_size = preferred
        maximum = min(maximum, MAX_PAYLOAD)
        self.maximum_block_size = maximum - maximum % minimum

    def _abort_handshake(self):
        """Soft disconnect after a refused option, as the spec asks of clients.

        The server's acknowledgement is awaited briefly; servers may also just
        close the connection.
        """
        try:
            self._send_option(NBD_OPT_ABORT)
            self._sock.settimeout(_ABORT_TIMEOUT)
            self._option_reply(NBD_OPT_ABORT)
        except Error:
            pass
        finally:
            self._close_socket()

    # Options.

    def _option(self, option, data=b""):
        self._send_option(option, data)
        return self._option_reply(option)

    def _send_option(self, option, data=b""):
        self._send(_OPTION.pack(IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option):
        """Receive one reply to option: (reply type, data)."""
        magic, echo, reply, length = _OPTION_REPLY.unpack(self._recv(_OPTION_REPLY.size))
        if magic != NBD_REP_MAGIC:
            raise self._broken(f"{self.url}: bad option reply magic 0x{magic:x}")
        if echo != option:
            raise self._broken(
                f"{self.url}: reply to option {echo} while waiting for {_option_name(option)}"
            )
        if length > _MAX_OPTION_REPLY:
            raise self._broken(f"{self.url}: option reply of {length} bytes is too large")
        return reply, self._recv(length) if length else b""

    def _option_failed(self, option, reply, data):
        message = _option_message(data)
        if reply == NBD_REP_ERR_UNKNOWN:
            text = f"export {self.address.export!r} not found on {self.url}{message}"
        elif reply == NBD_REP_ERR_TLS_REQD:
            text = (
                f"{self.url} requires TLS: use an nbds:// or nbds+unix:// URL, "
                f"or give tls_certs{message}"
            )
        elif reply & NBD_REP_FLAG_ERROR:
            name, meaning = _reply_error_name(reply)
            text = (
                f"{self.url}: the server refused {_option_name(option)}: "
                f"{name} ({meaning}){message}"
            )
        else:
            raise self._unexpected_reply(option, reply)
        return OptionError(text, option, reply)

    def _unexpected_reply(self, option, reply):
        return self._broken(f"{self.url}: unexpected reply type {reply} to {_option_name(option)}")

    # Transmission.

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
        if self.can_zero:
            flags = 0 if punch_hole else NBD_CMD_FLAG_NO_HOLE
            if fast:
                flags |= NBD_CMD_FLAG_FAST_ZERO
            self._send_split(
                operation, NBD_CMD_WRITE_ZEROES, flags, offset, length, MAX_ZERO_LENGTH
            )
        else:
            # Without NBD_CMD_WRITE_ZEROES, zeros are written as data.
            step = min(len(_ZEROS), self.maximum_block_size)
            for pos in range(0, length, step):
                size = min(step, length - pos)
                self._send_request(operation, NBD_CMD_WRITE, 0, offset + pos, size, _ZEROS[:size])
        return handle

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

    def _send_request(self, operation, command, flags, offset, length, view=None):
        while len(self._inflight) >= MAX_IN_FLIGHT:
            self._receive_reply()
        cookie = self._next_cookie
        self._next_cookie += 1
        request = _Request(cookie, command, offset, length, view, operation)
        operation.requests.append(request)
        operation.pending += 1
        self._inflight[cookie] = request
        header = _REQUEST.pack(NBD_REQUEST_MAGIC, flags, command, cookie, offset, length)
        if command == NBD_CMD_WRITE:
            self._send(header, view)
        else:
            self._send(header)
        return request

    def _receive_reply(self):
        """Receive one simple reply or one structured reply chunk."""
        self._check_ready()
        header = self._header
        self._recv_into(header[: _SIMPLE_REPLY.size])
        (magic,) = _MAGIC.unpack_from(header)
        if magic == NBD_STRUCTURED_REPLY_MAGIC:
            self._recv_into(header[_SIMPLE_REPLY.size :])
            flags, kind, cookie, length = _CHUNK.unpack_from(header)[1:]
            request = self._inflight_request(cookie)
            self._receive_chunk(request, kind, length)
            if flags & NBD_REPLY_FLAG_DONE:
                self._complete(request)
        elif magic == NBD_SIMPLE_REPLY_MAGIC:
            error, cookie = _SIMPLE_REPLY.unpack_from(header)[1:]
            request = self._inflight_request(cookie)
            if error:
                self._request_failed(request, error, "")
            elif request.command == NBD_CMD_READ:
                if self.structured_replies:
                    raise self._broken(
                        f"{self.url}: simple reply to a read after structured replies "
                        f"were negotiated"
                    )
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
    # (chunk offset - request offset); holes are filled with zeros there.

    def _receive_data(self, request, length):
        if request.command != NBD_CMD_READ or length <= _DATA_OFFSET.size:
            raise self._broken(
                f"{self.url}: invalid data chunk of {length} bytes for a "
                f"{_COMMAND_NAMES.get(request.command)} request"
            )
        offset_view = self._payload[: _DATA_OFFSET.size]
        self._recv_into(offset_view)
        (offset,) = _DATA_OFFSET.unpack_from(offset_view)
        size = length - _DATA_OFFSET.size
        start = self._chunk_start(request, offset, size)
        self._recv_into(request.view[start : start + size])
        request.received += size

    def _receive_hole(self, request, length):
        if request.command != NBD_CMD_READ or length != _HOLE.size:
            raise self._broken(f"{self.url}: invalid hole chunk of {length} bytes")
        self._recv_into(self._payload)
        offset, size = _HOLE.unpack_from(self._payload)
        start = self._chunk_start(request, offset, size)
        view = request.view
        end = start + size
        while start < end:
            step = min(len(_ZEROS), end - start)
            view[start : start + step] = _ZEROS[:step]
            start += step
        request.received += size

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
            or length < _STATUS_CONTEXT.size + _EXTENT.size
            or (length - _STATUS_CONTEXT.size) % _EXTENT.size
            or length > _MAX_STATUS_CHUNK
        ):
            raise self._broken(f"{self.url}: invalid block status chunk of {length} bytes")
        payload = self._recv(length)
        (context_id,) = _STATUS_CONTEXT.unpack_from(payload)
        name = self._context_names.get(context_id)
        if name is None:
            raise self._broken(f"{self.url}: block status for unknown context id {context_id}")
        extents = list(_EXTENT.iter_unpack(memoryview(payload)[_STATUS_CONTEXT.size :]))
        if min(extents)[0] == 0:
            raise self._broken(f"{self.url}: block status with an empty extent")
        request.extents.setdefault(name, []).extend(extents)

    def _receive_error(self, request, kind, length):
        if length < _ERROR.size or length > _MAX_ERROR_CHUNK:
            raise self._broken(f"{self.url}: invalid error chunk of {length} bytes")
        payload = self._recv(length)
        error, message_length = _ERROR.unpack_from(payload)
        end = _ERROR.size + message_length
        if end > length or error == 0:
            raise self._broken(f"{self.url}: invalid error chunk")
        message = bytes(payload[_ERROR.size : end]).decode("utf-8", "replace")
        error_offset = None
        if kind == NBD_REPLY_TYPE_ERROR_OFFSET:
            if length - end < _ERROR_OFFSET.size:
                raise self._broken(f"{self.url}: error offset chunk without offset")
            (error_offset,) = _ERROR_OFFSET.unpack_from(payload, end)
        self._request_failed(request, error, message, error_offset)

    def _request_failed(self, request, error, message, error_offset=None):
        if request.error is not None:
            return
        name, meaning = _ERROR_NAMES.get(error, (f"error {error}", "unknown NBD error"))
        where = f" (error at offset {error_offset})" if error_offset is not None else ""
        detail = f": {message}" if message else ""
        command = _COMMAND_NAMES.get(request.command, str(request.command))
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
            return f"{self.url}: TLS error{during}: {_reason(e)}{self._tls_hint()}"
        return f"{self.url}: connection lost{during}{self._tls_hint()}: {_reason(e)}"

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
        self.extents = {}
        self.error = None
        self.done = False


def _parse_legacy_url(url):
    """qemu's nbd:unix:PATH[:exportname=X] and nbd:HOST:PORT[:exportname=X]."""
    spec = url[len("nbd:") :]
    export = ""
    marker = spec.find(":exportname=")
    if marker >= 0:
        spec, export = spec[:marker], spec[marker + len(":exportname=") :]
    if spec.startswith("unix:"):
        path = spec[len("unix:") :]
        if not path:
            raise ValueError(f"invalid NBD URL {url!r}: missing socket path after 'nbd:unix:'")
        return Address("unix", path=path, export=export)
    if not spec:
        raise ValueError(f"invalid NBD URL {url!r}: missing HOST:PORT after 'nbd:'")
    host, port = _split_host_port(url, spec, None)
    return Address("tcp", host=host, port=port, export=export)


def _split_host_port(url, text, default_port):
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid NBD URL {url!r}: unterminated IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if ":" not in host:
            raise ValueError(f"invalid NBD URL {url!r}: {host!r} is not an IPv6 address")
        if rest and not rest.startswith(":"):
            raise ValueError(f"invalid NBD URL {url!r}: unexpected {rest!r} after the address")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, None
        if ":" in host:
            raise ValueError(
                f"invalid NBD URL {url!r}: write IPv6 addresses in brackets, e.g. [::1]:10809"
            )
    if not host:
        raise ValueError(f"invalid NBD URL {url!r}: missing host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"invalid NBD URL {url!r}: missing port, use nbd:HOST:PORT")
        return host, default_port
    if not port_text or port_text.strip("0123456789") or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid NBD URL {url!r}: invalid port {port_text!r}")
    return host, int(port_text)


def _url_export(url, path):
    # The export is the path without its first "/", percent-decoded.
    if path and not path.startswith("/"):
        raise ValueError(f"invalid NBD URL {url!r}: the export name must follow '/'")
    try:
        export = unquote(path[1:], errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"invalid NBD URL {url!r}: export name is not UTF-8") from None
    try:
        _check_string("export name", export)
    except ValueError as e:
        raise ValueError(f"invalid NBD URL {url!r}: {e}") from None
    return export


def _url_query(url, query):
    # RFC 3986 query: "+" is a plain character, only %XX is decoded.
    params = {}
    if not query:
        return params
    for item in query.split("&"):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"invalid NBD URL {url!r}: query parameter {key!r} has no value")
        key = unquote(key)
        if key in params:
            raise ValueError(f"invalid NBD URL {url!r}: query parameter {key!r} repeated")
        params[key] = unquote(value)
    return params


def _check_string(what, value):
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    if "\0" in value:
        raise ValueError(f"{what} {value!r} contains a NUL character")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value!r} is not valid Unicode") from None
    if len(encoded) > MAX_STRING:
        raise ValueError(f"{what} is longer than {MAX_STRING} bytes")


def _check_meta_context(name):
    _check_string("metadata context", name)
    namespace, sep, leaf = name.partition(":")
    if not sep or not namespace or not leaf:
        raise ValueError(
            f"invalid metadata context {name!r}: expected NAMESPACE:NAME, e.g. {BASE_ALLOCATION!r}"
        )


def _check_offset_length(offset, length):
    if offset < 0 or length < 0:
        raise ValueError(f"invalid offset {offset} or length {length}")


def _byte_view(buf):
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _reason(e):
    return e.strerror or str(e) or type(e).__name__


def _option_name(option):
    return _OPTION_NAMES.get(option, f"option {option}")


def _reply_error_name(reply):
    return _REPLY_ERRORS.get(reply, (f"error reply 0x{reply:x}", "unknown error"))


def _option_message(data):
    text = bytes(data).decode("utf-8", "replace").strip()
    return f": {text}" if text else ""
