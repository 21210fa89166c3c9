# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The NBD protocol on the wire: its numbers, message layouts, limits, names
for messages, and the errors its failures raise (proto.md).

Protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
qemu meta contexts: https://www.qemu.org/docs/master/interop/nbd.html
"""

from __future__ import annotations

import struct

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


ERROR_NAMES = {
    NBD_EPERM: ("EPERM", "operation not permitted"),
    NBD_EIO: ("EIO", "input/output error"),
    NBD_ENOMEM: ("ENOMEM", "cannot allocate memory"),
    NBD_EINVAL: ("EINVAL", "invalid argument"),
    NBD_ENOSPC: ("ENOSPC", "no space left on device"),
    NBD_EOVERFLOW: ("EOVERFLOW", "value too large"),
    NBD_ENOTSUP: ("ENOTSUP", "operation not supported"),
    NBD_ESHUTDOWN: ("ESHUTDOWN", "server is shutting down"),
}

OPTION_NAMES = {
    NBD_OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    NBD_OPT_ABORT: "NBD_OPT_ABORT",
    NBD_OPT_STARTTLS: "NBD_OPT_STARTTLS",
    NBD_OPT_GO: "NBD_OPT_GO",
    NBD_OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    NBD_OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}

REPLY_ERRORS = {
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

COMMAND_NAMES = {
    NBD_CMD_READ: "read",
    NBD_CMD_WRITE: "write",
    NBD_CMD_FLUSH: "flush",
    NBD_CMD_TRIM: "trim",
    NBD_CMD_WRITE_ZEROES: "zero",
    NBD_CMD_BLOCK_STATUS: "block status",
}

# Wire layouts, all big endian.
# S: NBDMAGIC (64) | IHAVEOPT or CLISERV_MAGIC (64)
GREETING = struct.Struct(">QQ")
# S: handshake flags (16)
HANDSHAKE_FLAGS = struct.Struct(">H")
# C: client flags (32)
CLIENT_FLAGS = struct.Struct(">I")
# C: IHAVEOPT (64) | option (32) | data length (32) | data
OPTION = struct.Struct(">QII")
# S: NBD_REP_MAGIC (64) | option (32) | reply type (32) | data length (32) | data
OPTION_REPLY = struct.Struct(">QIII")
# Length of a string in option data (32), or a count of queries (32)
UINT32 = struct.Struct(">I")
# Number of information requests (16), each an information type (16)
UINT16 = struct.Struct(">H")
# NBD_REP_INFO data: information type (16) | information
INFO_TYPE = struct.Struct(">H")
# NBD_INFO_EXPORT: type (16) | export size (64) | transmission flags (16)
INFO_EXPORT = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE: type (16) | minimum (32) | preferred (32) | maximum payload (32)
INFO_BLOCK_SIZE = struct.Struct(">HIII")
# NBD_REP_META_CONTEXT data: context id (32) | name
META_CONTEXT = struct.Struct(">I")
# NBD_OPT_EXPORT_NAME reply: export size (64) | transmission flags (16) | [124 zero bytes]
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = 124
# C: magic (32) | command flags (16) | type (16) | cookie (64) | offset (64) | length (32)
REQUEST = struct.Struct(">IHHQQI")
# S: magic (32) | error (32) | cookie (64)
SIMPLE_REPLY = struct.Struct(">IIQ")
# S: magic (32) | flags (16) | type (16) | cookie (64) | payload length (32)
CHUNK = struct.Struct(">IHHQI")
# First word of any reply: magic (32)
MAGIC = struct.Struct(">I")
# NBD_REPLY_TYPE_OFFSET_DATA payload: offset (64) | data
DATA_OFFSET = struct.Struct(">Q")
# NBD_REPLY_TYPE_OFFSET_HOLE payload: offset (64) | hole size (32)
HOLE = struct.Struct(">QI")
# NBD_REPLY_TYPE_BLOCK_STATUS payload: context id (32) | descriptors
STATUS_CONTEXT = struct.Struct(">I")
# Block status descriptor: extent length (32) | status flags (32)
EXTENT = struct.Struct(">II")
# Error chunk payload: error (32) | message length (16) | message | [offset (64)]
ERROR = struct.Struct(">IH")
ERROR_OFFSET = struct.Struct(">Q")


def check_string(what, value):
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


def option_name(option):
    return OPTION_NAMES.get(option, f"option {option}")


def reply_error_name(reply):
    return REPLY_ERRORS.get(reply, (f"error reply 0x{reply:x}", "unknown error"))


def option_message(data):
    text = bytes(data).decode("utf-8", "replace").strip()
    return f": {text}" if text else ""


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
