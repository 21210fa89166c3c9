# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The NBD handshake (proto.md, "Handshake"): connecting, TLS, options,
selecting the export, and what the export's transmission flags allow, as a
part of _nbd.Client."""

from __future__ import annotations

import os
import socket
import ssl

from ansible_collections.thinair.ovirt.plugins.module_utils._nbd_wire import (
    CLIENT_FLAGS,
    CLISERV_MAGIC,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    GREETING,
    HANDSHAKE_FLAGS,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_TYPE,
    MAX_PAYLOAD,
    META_CONTEXT,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_PLATFORM,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_TOO_BIG,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_FLAG_ERROR,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REP_META_CONTEXT,
    NBDMAGIC,
    OPTION,
    OPTION_REPLY,
    UINT16,
    UINT32,
    Error,
    OptionError,
    ProtocolError,
    option_message,
    option_name,
    reply_error_name,
)

# Seconds to wait for the server to acknowledge NBD_OPT_ABORT.
ABORT_TIMEOUT = 1.0

# Option replies are small; anything larger is a broken server.
MAX_OPTION_REPLY = 64 * 1024

# Socket buffers of a unix connection (the system caps them at
# net.core.wmem_max and rmem_max): with the default 208 KiB, every 2 MiB
# request takes a dozen system calls each way, and as many waits.
UNIX_SOCKET_BUFFER = 4 * 1024**2


class HandshakeMixin:
    """Negotiates a connection of _nbd.Client, whose attributes and wire
    helpers (_recv, _send, _broken, _close_socket) it uses; sets the
    export's size, transmission flags, block sizes and meta contexts."""

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
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SOCKET_BUFFER)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UNIX_SOCKET_BUFFER)
                    sock.settimeout(self._connect_timeout)
                    sock.connect(address.path)
                except BaseException:
                    sock.close()
                    raise
        except OSError as e:
            raise ProtocolError(f"cannot connect to {self.url}: {reason(e)}") from e
        self._sock = sock

    def _handshake(self, tls_context, tls_hostname, meta_contexts):
        magic, version = GREETING.unpack(self._recv(GREETING.size))
        if magic != NBDMAGIC:
            raise self._broken(f"{self.url} is not an NBD server (bad greeting 0x{magic:x})")
        if version == CLISERV_MAGIC:
            raise self._broken(
                f"{self.url} uses the oldstyle NBD handshake, which is not supported; "
                f"run the server in newstyle mode"
            )
        if version != IHAVEOPT:
            raise self._broken(f"{self.url}: unknown NBD handshake 0x{version:x}")
        (server_flags,) = HANDSHAKE_FLAGS.unpack(self._recv(HANDSHAKE_FLAGS.size))
        fixed = bool(server_flags & NBD_FLAG_FIXED_NEWSTYLE)
        no_zeroes = bool(server_flags & NBD_FLAG_NO_ZEROES)
        client_flags = (NBD_FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (
            NBD_FLAG_C_NO_ZEROES if no_zeroes else 0
        )
        self._send(CLIENT_FLAGS.pack(client_flags))

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
                name = reply_error_name(reply)[0]
                message = option_message(data)
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
            raise ProtocolError(f"{self.url}: TLS handshake failed: {reason(e)}") from e
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
        parts = [UINT32.pack(len(export)), export, UINT32.pack(len(names))]
        for name in names:
            encoded = name.encode("utf-8")
            parts += [UINT32.pack(len(encoded)), encoded]
        self._send_option(NBD_OPT_SET_META_CONTEXT, b"".join(parts))
        contexts = {}
        while True:
            reply, data = self._option_reply(NBD_OPT_SET_META_CONTEXT)
            if reply == NBD_REP_META_CONTEXT:
                if len(data) <= META_CONTEXT.size:
                    raise self._broken(f"{self.url}: invalid NBD_REP_META_CONTEXT reply")
                (context_id,) = META_CONTEXT.unpack_from(data)
                name = bytes(data[META_CONTEXT.size :]).decode("utf-8", "replace")
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
                UINT32.pack(len(export)),
                export,
                UINT16.pack(1),
                UINT16.pack(NBD_INFO_BLOCK_SIZE),
            ]
        )
        self._send_option(NBD_OPT_GO, data)
        have_export = False
        block_sizes = None
        while True:
            reply, data = self._option_reply(NBD_OPT_GO)
            if reply == NBD_REP_INFO:
                if len(data) < INFO_TYPE.size:
                    raise self._broken(f"{self.url}: invalid NBD_REP_INFO reply")
                (info,) = INFO_TYPE.unpack_from(data)
                if info == NBD_INFO_EXPORT:
                    if len(data) != INFO_EXPORT.size:
                        raise self._broken(f"{self.url}: invalid NBD_INFO_EXPORT reply")
                    size, flags = INFO_EXPORT.unpack(data)[1:]
                    have_export = True
                elif info == NBD_INFO_BLOCK_SIZE:
                    if len(data) != INFO_BLOCK_SIZE.size:
                        raise self._broken(f"{self.url}: invalid NBD_INFO_BLOCK_SIZE reply")
                    block_sizes = INFO_BLOCK_SIZE.unpack(data)[1:]
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
        size, flags = EXPORT_NAME_REPLY.unpack(self._recv(EXPORT_NAME_REPLY.size, closed))
        if not no_zeroes:
            self._recv(EXPORT_NAME_PADDING)
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
            self._sock.settimeout(ABORT_TIMEOUT)
            self._option_reply(NBD_OPT_ABORT)
        except Error:
            pass
        finally:
            self._close_socket()

    def _option(self, option, data=b""):
        self._send_option(option, data)
        return self._option_reply(option)

    def _send_option(self, option, data=b""):
        self._send(OPTION.pack(IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option):
        """Receive one reply to option: (reply type, data)."""
        magic, echo, reply, length = OPTION_REPLY.unpack(self._recv(OPTION_REPLY.size))
        if magic != NBD_REP_MAGIC:
            raise self._broken(f"{self.url}: bad option reply magic 0x{magic:x}")
        if echo != option:
            raise self._broken(
                f"{self.url}: reply to option {echo} while waiting for {option_name(option)}"
            )
        if length > MAX_OPTION_REPLY:
            raise self._broken(f"{self.url}: option reply of {length} bytes is too large")
        return reply, self._recv(length) if length else b""

    def _option_failed(self, option, reply, data):
        message = option_message(data)
        if reply == NBD_REP_ERR_UNKNOWN:
            text = f"export {self.address.export!r} not found on {self.url}{message}"
        elif reply == NBD_REP_ERR_TLS_REQD:
            text = (
                f"{self.url} requires TLS: use an nbds:// or nbds+unix:// URL, "
                f"or give tls_certs{message}"
            )
        elif reply & NBD_REP_FLAG_ERROR:
            name, meaning = reply_error_name(reply)
            text = (
                f"{self.url}: the server refused {option_name(option)}: {name} ({meaning}){message}"
            )
        else:
            raise self._unexpected_reply(option, reply)
        return OptionError(text, option, reply)

    def _unexpected_reply(self, option, reply):
        return self._broken(f"{self.url}: unexpected reply type {reply} to {option_name(option)}")


def reason(e):
    """What an OSError says, for messages."""
    return e.strerror or str(e) or type(e).__name__
