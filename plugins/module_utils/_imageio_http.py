# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""HTTP to an imageio daemon or proxy: its URLs, connections over TLS, TCP
or the daemon's unix socket, what OPTIONS tells, sending files, reading
bodies, and the errors a user can act on."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import ssl
from urllib.parse import urlsplit

from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import KiB, MiB

# Buffer for sending a file's data over TLS, which sendfile(2) cannot do.
FILE_BUFFER = 1 * MiB

# How much of an error reply is read and reported; imageio's error texts are
# one line.
ERROR_TEXT_LIMIT = 4 * KiB

# Server capabilities reported by OPTIONS (handlers/images.py).
FEATURE_CHECKSUM = "checksum"
FEATURE_EXTENTS = "extents"
FEATURE_FLUSH = "flush"
FEATURE_ZERO = "zero"
FEATURES = frozenset((FEATURE_CHECKSUM, FEATURE_EXTENTS, FEATURE_FLUSH, FEATURE_ZERO))

# How requests reach the daemon (ImageioEndpoint.used).
USED_UNIX = "unix"
USED_HOST = "host"
USED_PROXY = "proxy"


class Error(Exception):
    """An imageio request failed.

    status is the HTTP status of the server's answer, or None when there was
    no answer (connection refused or lost, timeout, TLS failure). The message
    names the request, the URL and the server's own text.
    """

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class ConnectionLost(Exception):
    """The server closed the connection in the middle of a reply."""


class Options:
    """What OPTIONS says about a ticket (handlers/images.py)."""

    def __init__(self, status, allow, body):
        # Old daemons answer 405 and old proxies 204: no features then.
        info = {}
        if status == http.client.OK:
            try:
                info = json.loads(body.decode("utf-8"))
            except ValueError:
                info = {}
            if not isinstance(info, dict):
                info = {}
        self.features = frozenset(f for f in info.get("features", ()) if f in FEATURES)
        self.unix_socket = info.get("unix_socket") or None
        methods = {m.strip().upper() for m in (allow or "").split(",")}
        self.writable = "PUT" in methods
        # Servers that do not publish limits allow a single connection.
        max_readers = _positive(info.get("max_readers"))
        max_writers = _positive(info.get("max_writers"))
        if allow is None:
            self.max_connections = min(max_readers, max_writers)
        elif self.writable:
            self.max_connections = max_writers
        else:
            self.max_connections = max_readers


class Target:
    """One URL of the ticket: the host daemon's or the proxy's."""

    def __init__(self, url, role, context, connect_timeout, timeout):
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            kind = "proxy" if role == USED_PROXY else "transfer"
            raise Error(f"Invalid {kind} URL {url!r}: use https://HOST[:PORT]/images/TICKET")
        self.url = url
        self.role = role
        self.scheme = parts.scheme
        self.hostname = parts.hostname
        self.port = port or (443 if parts.scheme == "https" else 80)
        self.path = parts.path or "/"
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.context = context if parts.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self.timeout = timeout

    def connect(self):
        if self.context is not None:
            con = _HTTPSConnection(
                self.hostname, self.port, timeout=self.connect_timeout, context=self.context
            )
        else:
            con = _HTTPConnection(self.hostname, self.port, timeout=self.connect_timeout)
        con.read_timeout = self.timeout
        return _connected(con)

    def connect_unix(self, path):
        return _connected(_UnixHTTPConnection(path, self.connect_timeout, self.timeout))


class Route:
    """How requests reach a target: over TCP, or the daemon's unix socket."""

    def __init__(self, target, unix_socket=None):
        self.target = target
        self.unix_socket = unix_socket
        self.used = USED_UNIX if unix_socket is not None else target.role

    def connect(self):
        if self.unix_socket is not None:
            return self.target.connect_unix(self.unix_socket)
        return self.target.connect()


def open_route(target, unix_socket_mode):
    """Connect to target, ask OPTIONS, and move to the daemon's unix socket
    when it runs here; return (route, connection, options).

    OSError means the target cannot be reached; Error is the server's answer.
    """
    con = target.connect()
    try:
        con.request("OPTIONS", target.path)
        resp = con.getresponse()
        body = resp.read()
        if resp.status not in (
            http.client.OK,
            http.client.NO_CONTENT,
            http.client.METHOD_NOT_ALLOWED,
        ):
            raise http_error("OPTIONS", target.url, resp, body[:ERROR_TEXT_LIMIT])
        options = Options(resp.status, resp.getheader("Allow"), body)
        route = Route(target)
        if unix_socket_mode == "auto" and options.unix_socket and _is_local(con):
            try:
                unix_con = target.connect_unix(options.unix_socket)
            except OSError:
                # The daemon's socket may be private to its host; TCP works.
                pass
            else:
                con.close()
                con = unix_con
                route = Route(target, options.unix_socket)
        return route, con, options
    except http.client.HTTPException as e:
        con.close()
        raise Error(f"OPTIONS {target.url}: bad reply: {describe(e)}") from None
    except BaseException:
        con.close()
        raise


class _ReadTimeoutMixin:
    """Connects within the connect timeout, then waits up to read_timeout
    for each reply."""

    read_timeout = None

    def connect(self):
        super().connect()
        self.sock.settimeout(self.read_timeout)


class _HTTPConnection(_ReadTimeoutMixin, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ReadTimeoutMixin, http.client.HTTPSConnection):
    pass


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the daemon's local socket; a name starting with "\\0" is in
    the abstract namespace."""

    def __init__(self, path, connect_timeout, read_timeout):
        super().__init__("localhost", timeout=connect_timeout)
        self.socket_path = path
        self.read_timeout = read_timeout

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
            sock.settimeout(self.read_timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _connected(con):
    """con, connected; closed when it cannot connect."""
    try:
        con.connect()
    except BaseException:
        con.close()
        raise
    return con


def ssl_context(ca_file, insecure):
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise Error(
            f"Cannot load CA certificates from {ca_file!r}: {describe(e)}: give the "
            f"engine CA file (PEM)"
        ) from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _is_local(con):
    """Whether the TCP connection ends on this machine: both ends have the
    same address (a connection to 127.0.0.2 comes from 127.0.0.1, so only
    the address the daemon listens on counts)."""
    sock = con.sock
    return sock is not None and sock.getsockname()[0] == sock.getpeername()[0]


def send_view(view):
    def send(con):
        con.send(view)

    return send


def sendfile(sock, fd, offset, count):
    """Send count bytes of the file fd from offset with sendfile(2); return
    how many were sent (fewer when the file ends first)."""
    out = sock.fileno()
    timeout = sock.gettimeout()
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(out, fd, offset + sent, count - sent)
        except BlockingIOError:
            # A socket with a timeout is non-blocking underneath.
            _wait_writable(out, timeout)
            continue
        if n == 0:
            break
        sent += n
    return sent


def send_file_copy(sock, fd, offset, count):
    """Send count bytes of the file fd from offset through a buffer; return
    how many were sent (fewer when the file ends first)."""
    buf = bytearray(min(count, FILE_BUFFER))
    view = memoryview(buf)
    sent = 0
    while sent < count:
        n = os.preadv(fd, [view[: count - sent]], offset + sent)
        if n == 0:
            break
        sock.sendall(view[:n])
        sent += n
    return sent


def _wait_writable(fd, timeout):
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(None if timeout is None else timeout * 1000):
        raise socket.timeout("timed out")


def read_body(con, resp, view):
    """Read resp's body, exactly len(view) bytes, into view.

    http.client reads a body through a buffered file, three Python calls for
    every TLS record (16 KiB); after what that buffer holds, reading the
    socket itself saves about a tenth of a download's CPU.
    """
    sock = con.sock
    if sock is None or resp.fp is None:
        # The server closes the connection after this reply (http.client
        # gave the socket to the response alone).
        _read_exactly(resp, view)
        return
    length = len(view)
    pos = resp.fp.readinto1(view)
    while pos < length:
        n = sock.recv_into(view[pos:], length - pos)
        if not n:
            raise ConnectionLost(f"the server sent {pos} of {length} bytes")
        pos += n
    # The body is read: the connection is ready for the next request.
    resp.close()


def _read_exactly(resp, view):
    pos = 0
    length = len(view)
    while pos < length:
        n = resp.readinto(view[pos:])
        if not n:
            raise ConnectionLost(f"the server sent {pos} of {length} bytes")
        pos += n


def http_error(method, where, resp, text):
    """The Error for an HTTP error answer; imageio's text ends with a newline."""
    text = text.decode("utf-8", errors="replace").strip()
    return Error(f"{method} {where}: {resp.status} {resp.reason}: {text}", status=resp.status)


def json_reply(resp, method, where):
    data = resp.read()
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError:
        raise Error(f"{method} {where}: the reply is not JSON: {data[:200]!r}") from None


def set_read_timeout(con, timeout):
    con.read_timeout = timeout
    if con.sock is not None:
        con.sock.settimeout(timeout)


def byte_range(offset, length):
    return f"bytes={offset}-{offset + length - 1}"


def _positive(value):
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 1


def describe(e):
    """A short text for a connection failure, naming certificate problems."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return (
            f"certificate verification failed ({e.verify_message or e.reason}): give "
            f"ca_file with the CA that signed the server's certificate (the engine CA), "
            f"or use insecure"
        )
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection"
    if isinstance(e, (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError)):
        return f"the server closed the connection ({e})"
    if isinstance(e, http.client.IncompleteRead):
        return f"the server closed the connection after {len(e.partial)} bytes of the reply"
    text = str(e) or type(e).__name__
    return text
