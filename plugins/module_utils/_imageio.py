# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Client of the ovirt-imageio HTTP data plane, as a copy endpoint.

API: https://github.com/oVirt/ovirt-imageio/blob/master/docs/images.md

An image transfer gives two URLs for the same ticket: ``transfer_url`` on the
host daemon and ``proxy_url`` on the engine's imageio proxy. The endpoint
connects to the host first and uses the proxy only when the host cannot be
reached at all; an HTTP error from the host (403 for a bad ticket) is an
answer, so it does not fall back. When the host daemon runs on this machine,
requests go through its local unix socket, which saves TLS and TCP; data from
a local file then goes from the file to the socket without passing through
this process (write_from_file, sendfile(2)).

One ImageioEndpoint is one keep-alive connection and is not thread safe;
``clone()`` opens another connection to the same place for another worker.
What the server told (features, limits, extents) is shared by the clones.
"""

from __future__ import annotations

import bisect
import http.client
import json
import os
import re
import select
import socket
import ssl
import threading
import time
from urllib.parse import urlencode, urlsplit

from ansible_collections.thinair.ovirt.plugins.module_utils import _copy
from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import KiB, MiB

# Largest request sent by readinto() and write(): the daemon moves data in
# 8 MiB steps (its backends' buffer_size), and larger requests only make a
# worker wait longer before anything overlaps.
MAX_REQUEST = 8 * MiB

# The daemon zeroes in 128 MiB steps; a larger PATCH holds the connection
# without doing more per request.
MAX_ZERO = 128 * MiB

# Buffer of zeros streamed by PUT when the server cannot zero by itself.
ZERO_BUFFER = 1 * MiB

# Buffer for sending a file's data over TLS, which sendfile(2) cannot do.
FILE_BUFFER = 1 * MiB

# How much of an error reply is read and reported; imageio's error texts are
# one line.
ERROR_TEXT_LIMIT = 4 * KiB

# The ticket size in a Content-Range header (RFC 9110 14.4).
CONTENT_RANGE_SIZE = re.compile(r"^bytes (?:\d+-\d+|\*)/(\d+)$")

# Server capabilities reported by OPTIONS (handlers/images.py).
FEATURE_CHECKSUM = "checksum"
FEATURE_EXTENTS = "extents"
FEATURE_FLUSH = "flush"
FEATURE_ZERO = "zero"
FEATURES = frozenset((FEATURE_CHECKSUM, FEATURE_EXTENTS, FEATURE_FLUSH, FEATURE_ZERO))

# Values of ImageioEndpoint.used.
USED_UNIX = "unix"
USED_HOST = "host"
USED_PROXY = "proxy"

UNIX_SOCKET_MODES = ("auto", "never")

DEFAULT_CHECKSUM_ALGORITHM = "blake2b"
DEFAULT_CHECKSUM_BLOCK_SIZE = 4 * MiB


# Requests that lost their connection are sent again, on a new one, until
# this many seconds have passed since the first failure: long enough for the
# daemon to restart. The pause between tries grows up to RETRY_MAX_PAUSE.
RETRY_TIMEOUT = 60.0
RETRY_FIRST_PAUSE = 0.1
RETRY_MAX_PAUSE = 2.0
# How many retried requests the endpoint and its clones remember.
RETRY_LOG_LIMIT = 20

# Marks "the endpoint's own reply timeout" where None means no limit.
_ENDPOINT_TIMEOUT = object()


class Error(Exception):
    """An imageio request failed.

    status is the HTTP status of the server's answer, or None when there was
    no answer (connection refused or lost, timeout, TLS failure). The message
    names the request, the URL and the server's own text.
    """

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class _ConnectionLost(Exception):
    """The server closed the connection in the middle of a reply."""


class _Retryable(Exception):
    """The request got no answer, or the daemon that came back does not
    know the ticket yet: sending it again may work."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class ImageioEndpoint:
    """An imageio ticket as a copy endpoint (see _copy.NbdEndpoint).

    transfer_url: the image transfer's transfer_url (the host daemon).
    proxy_url: the image transfer's proxy_url, tried only when transfer_url
        cannot be reached (refused, unknown name, TLS failure, timeout).
    ca_file: CA certificates trusted for https URLs (the engine CA); None
        trusts the system CAs. insecure: do not verify the server.
    unix_socket: "auto" uses the daemon's local unix socket when the daemon
        runs on this machine; "never" stays on TCP.
    is_zero: the image is known to read as zeros (a new disk), so a copy into
        it may skip zero extents.
    connect_timeout, timeout: seconds to connect, and to wait for each reply.
    retry_timeout: how long a request that lost its connection (the daemon
        restarting, a connection reset) is sent again on new connections.
        Every request is idempotent: a ranged GET or PUT, a zero or a flush
        of the same range does the same again. ``retries`` tells which were.
    """

    def __init__(
        self,
        transfer_url,
        proxy_url=None,
        ca_file=None,
        insecure=False,
        unix_socket="auto",
        is_zero=False,
        connect_timeout=10.0,
        timeout=60.0,
        retry_timeout=RETRY_TIMEOUT,
    ):
        if unix_socket not in UNIX_SOCKET_MODES:
            modes = " or ".join(UNIX_SOCKET_MODES)
            raise Error(f"Invalid unix_socket {unix_socket!r}: use {modes}")
        if not transfer_url:
            raise Error("No transfer_url: give the image transfer's transfer_url")
        context = _ssl_context(ca_file, insecure)
        targets = [_Target(transfer_url, USED_HOST, context, connect_timeout, timeout)]
        if proxy_url:
            targets.append(_Target(proxy_url, USED_PROXY, context, connect_timeout, timeout))

        self.is_zero = is_zero
        self.max_request = MAX_REQUEST
        self._con = None
        self._zeros = None
        failures = []
        for target in targets:
            try:
                self._route, self._con, options = _open_route(target, unix_socket)
                break
            except OSError as e:
                failures.append(f"{target.role} {target.url}: {_describe(e)}")
        else:
            raise Error("Cannot reach imageio: " + "; ".join(failures))
        self._unix_socket_mode = unix_socket
        self.features = options.features
        self.writable = options.writable
        self.max_connections = options.max_connections
        self._image = _Image()
        self._con_generation = self._image.generation
        self.retry_timeout = retry_timeout
        self._retries = _RetryLog()

    # Where requests go.

    @property
    def used(self):
        """How this connection reaches the ticket: "unix", "host" or "proxy"."""
        return self._route.used

    @property
    def url(self):
        """The URL requests are made for (through the unix socket when used)."""
        return self._route.target.url

    @property
    def local_socket(self):
        """The daemon's local socket when used is "unix", else None."""
        return self._route.unix_socket

    @property
    def retries(self):
        """What had to be sent again, by this endpoint and its clones: one
        line for each request, saying what failed and how it ended."""
        return self._retries.lines()

    @property
    def size(self):
        """Size of the image: imageio does not report it, so it is the end of
        the last extent."""
        return self._image.size(self)

    # Copy endpoint interface.

    def clone(self):
        """Another connection to the same URL or socket, sharing what the
        server told this one."""
        clone = object.__new__(ImageioEndpoint)
        clone.is_zero = self.is_zero
        clone.max_request = self.max_request
        clone.features = self.features
        clone.writable = self.writable
        clone.max_connections = self.max_connections
        clone._unix_socket_mode = self._unix_socket_mode
        clone._route = self._route
        clone._image = self._image
        clone.retry_timeout = self.retry_timeout
        clone._retries = self._retries
        clone._zeros = None
        clone._con = None
        clone._con_generation = self._image.generation
        try:
            clone._con = clone._reconnect()
        except OSError as e:
            raise Error(
                f"Cannot open another connection to {clone._where()}: {_describe(e)}"
            ) from None
        return clone

    def extents(self, offset=0, length=None):
        """Yield _copy.Extent covering [offset, offset + length), in order.

        The whole map is asked once per ticket (imageio has no ranged
        extents request) and kept for every clone until something is written.
        """
        extents = self._image.extents(self)
        end = self.size if length is None else min(offset + length, self.size)
        i = max(bisect.bisect_right(extents.starts, offset) - 1, 0)
        while offset < end and i < len(extents.items):
            ext = extents.items[i]
            i += 1
            if ext.end <= offset:
                continue
            stop = min(ext.end, end)
            yield _copy.Extent(offset, stop - offset, ext.zero, ext.hole)
            offset = stop

    def readinto(self, offset, buf):
        """Fill buf with the image bytes at offset (ranged GETs)."""
        with memoryview(buf) as outer, outer.cast("B") as view:
            for start in range(0, len(view), self.max_request):
                chunk = view[start : start + self.max_request]
                self._call("GET", *self._get_range(offset + start, chunk))

    def write(self, offset, buf):
        """Write buf at offset (PUT with Content-Range)."""
        self._image.changed()
        with memoryview(buf) as outer, outer.cast("B") as view:
            for start in range(0, len(view), self.max_request):
                chunk = view[start : start + self.max_request]
                self._call("PUT", *self._put(offset + start, len(chunk), _send_view(chunk)))

    @property
    def can_write_from_file(self):
        """Whether write_from_file() sends file data without copying it: on
        a connection without TLS (the daemon's unix socket, or http)."""
        return self._route.unix_socket is not None or self._route.target.scheme == "http"

    def write_from_file(self, offset, fd, file_offset, length):
        """Write length bytes of the open file fd, from file_offset, at offset.

        Without TLS the kernel sends them from the file (sendfile(2)): they
        never pass through this process.
        """
        self._image.changed()
        for start in range(0, length, self.max_request):
            step = min(self.max_request, length - start)
            send = self._send_file(fd, file_offset + start, step)
            self._call("PUT", *self._put(offset + start, step, send))

    def zero(self, offset, length):
        """Make [offset, offset + length) read as zeros."""
        self._image.changed()
        end = offset + length
        while offset < end:
            if FEATURE_ZERO in self.features:
                step = min(end - offset, MAX_ZERO)
                # A server that cannot flush at the end must do it now.
                msg = {
                    "op": "zero",
                    "offset": offset,
                    "size": step,
                    "flush": FEATURE_FLUSH not in self.features,
                }
                self._call("PATCH", *self._patch(msg))
            else:
                step = min(end - offset, self.max_request)
                self._call("PUT", *self._put(offset, step, self._send_zeros(step)))
            offset += step

    def flush(self):
        """Make what was written durable (no-op on servers that flush every
        request)."""
        if FEATURE_FLUSH in self.features:
            # A PUT answered 200 has reached the backend (qemu-nbd or the
            # file), which outlives a restart of the daemon.
            self._call("PATCH", *self._patch({"op": "flush"}))

    def checksum(
        self,
        algorithm=DEFAULT_CHECKSUM_ALGORITHM,
        block_size=DEFAULT_CHECKSUM_BLOCK_SIZE,
        timeout=None,
    ):
        """The server's block checksum of the image (see _checksum).

        The daemon reads the whole image before it answers, so by default
        this waits as long as the daemon works (timeout=None); give seconds
        to bound it.
        """
        if FEATURE_CHECKSUM not in self.features:
            raise Error(f"{self._where()} does not support checksums")
        self._renew_proxy_view()
        query = urlencode({"algorithm": algorithm, "block_size": block_size})
        path = self._route.target.path + "/checksum?" + query

        def request(con):
            con.request("GET", path)
            resp = con.getresponse()
            self._check(resp, "GET", path, (http.client.OK,))
            return _json_reply(resp, "GET", self._where(path))

        return self._call("GET", path, request, timeout=timeout)

    def close(self):
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return f"<ImageioEndpoint {self.url} via {self.used}>"

    # Private helpers.

    def _get_range(self, offset, view):
        path = self._route.target.path
        length = len(view)

        def request(con):
            con.request("GET", path, headers={"Range": _range(offset, length)})
            resp = con.getresponse()
            self._check(resp, "GET", path, (http.client.PARTIAL_CONTENT,))
            if resp.length != length:
                self._drop()
                raise Error(
                    f"GET {self._where()}: the server sent {resp.length} bytes for a "
                    f"request of {length} bytes at offset {offset}"
                )
            _read_body(con, resp, view)

        return path, request

    def _put(self, offset, length, send_body):
        path = self._route.target.path
        if FEATURE_FLUSH in self.features:
            # Flushed once at the end by flush().
            path += "?flush=n"

        def request(con):
            con.putrequest("PUT", path, skip_accept_encoding=True)
            con.putheader("Content-Type", "application/octet-stream")
            con.putheader("Content-Length", str(length))
            con.putheader("Content-Range", f"bytes {offset}-{offset + length - 1}/*")
            con.endheaders()
            try:
                send_body(con)
            except OSError as e:
                # The server may refuse a request (bad ticket, range) before
                # reading its body, answer, and close; the answer says why.
                if isinstance(e, socket.timeout):
                    raise
                try:
                    resp = con.getresponse()
                except (OSError, http.client.HTTPException):
                    raise e from None
            else:
                resp = con.getresponse()
            self._check(resp, "PUT", path, (http.client.OK,))
            resp.read()

        return path, request

    def _patch(self, msg):
        path = self._route.target.path
        body = json.dumps(msg).encode("utf-8")

        def request(con):
            con.request("PATCH", path, body=body, headers={"Content-Type": "application/json"})
            resp = con.getresponse()
            self._check(resp, "PATCH", path, (http.client.OK,))
            resp.read()

        return path, request

    def _send_zeros(self, length):
        if self._zeros is None:
            self._zeros = memoryview(bytes(ZERO_BUFFER))
        zeros = self._zeros

        def send(con):
            todo = length
            while todo:
                step = min(todo, len(zeros))
                con.send(zeros[:step])
                todo -= step

        return send

    def _send_file(self, fd, file_offset, length):
        def send(con):
            sock = con.sock
            if isinstance(sock, ssl.SSLSocket):
                # sendfile(2) cannot encrypt: over TLS (a route that moved
                # there when the daemon came back without its unix socket)
                # the data goes through memory.
                sent = _send_file_copy(sock, fd, file_offset, length)
            else:
                sent = _sendfile(sock, fd, file_offset, length)
            if sent < length:
                # The server waits for the rest of the body: drop the connection.
                self._drop()
                raise Error(
                    f"PUT {self._where()}: the local file ends at offset {file_offset + sent}, "
                    f"before the {length} bytes from offset {file_offset} could be sent"
                )

        return send

    def _call(self, method, path, request, timeout=_ENDPOINT_TIMEOUT):
        """Run request(con) on this endpoint's connection and return its result.

        A request whose connection died (the daemon restarted or dropped an
        idle connection) is sent again on new connections, at once and then
        after growing pauses, until retry_timeout has passed: every request
        is idempotent. timeout replaces the endpoint's reply timeout for
        this request (None: no limit).
        """
        if timeout is _ENDPOINT_TIMEOUT:
            timeout = self._route.target.timeout
        first_error = None
        started = failures = 0
        pause = 0.0
        while True:
            try:
                result = self._try(method, path, request, timeout, first_error is not None)
            except _Retryable as e:
                error = f"{method} {self._where(path)}: {e}"
                now = time.monotonic()
                if first_error is None:
                    first_error, started = error, now
                failures += 1
                remaining = started + self.retry_timeout - now
                if remaining <= 0:
                    if failures > 1:
                        error += f" (sent {failures} times in {now - started:.1f} s)"
                        self._retries.add(f"{first_error}; gave up: {error}")
                    raise Error(error, status=e.status) from None
                time.sleep(min(pause, remaining))
                pause = min(max(pause * 2, RETRY_FIRST_PAUSE), RETRY_MAX_PAUSE)
                continue
            if failures:
                elapsed = time.monotonic() - started
                self._retries.add(
                    f"{first_error}; succeeded when sent again "
                    f"({failures + 1} tries in {elapsed:.1f} s)"
                )
            return result

    def _try(self, method, path, request, timeout, retrying):
        """One try of request(con); _Retryable when another try may work."""
        try:
            if self._con is None:
                self._con_generation = self._image.generation
                self._con = self._reconnect()
        except OSError as e:
            raise _Retryable(f"cannot connect: {_describe(e)}") from None
        con = self._con
        _set_read_timeout(con, timeout)
        try:
            return request(con)
        except Error as e:
            # A daemon that came back gets its tickets again from vdsm a
            # moment after it listens.
            if retrying and e.status == http.client.FORBIDDEN:
                raise _Retryable(str(e).split(": ", 1)[-1], e.status) from None
            raise
        except socket.timeout:
            self._drop()
            raise Error(f"{method} {self._where(path)}: no reply within {timeout:g} s") from None
        except (OSError, http.client.HTTPException, _ConnectionLost) as e:
            self._drop()
            raise _Retryable(_describe(e)) from None
        finally:
            _set_read_timeout(con, self._route.target.timeout)

    def _reconnect(self):
        route = self._route
        try:
            return route.connect()
        except OSError:
            if route.unix_socket is None:
                raise
        # The daemon came back with another local socket (or none): find the
        # way again through its URL.
        self._route, con, _options = _open_route(route.target, self._unix_socket_mode)
        return con

    def _renew_proxy_view(self):
        """Open a new connection to the proxy if the image changed since
        this one was opened.

        The proxy reads the host through a backend it keeps for each client
        connection, and that backend keeps the first extent map it got. Its
        extents, and its checksums (which skip what the map says is zero),
        then describe the image as it was:

            connection 1   GET (map: all zero) ... PUT data ... GET /checksum
                                                   -> checksum of zeros
            connection 2                                   GET /checksum
                                                   -> checksum of the data
        """
        if self._route.used == USED_PROXY and self._con_generation != self._image.generation:
            self._drop()

    def _drop(self):
        """Close a connection left in an unknown state; the next request
        opens a new one."""
        if self._con is not None:
            self._con.close()
            self._con = None

    def _check(self, resp, method, path, expected):
        if resp.status in expected:
            return
        text = resp.read(ERROR_TEXT_LIMIT)
        if not resp.isclosed():
            # An unread body would be taken for the next reply.
            self._drop()
        raise _http_error(method, self._where(path), resp, text)

    def _where(self, path=None):
        """The URL of a request, and the socket when not over TCP."""
        target = self._route.target
        url = target.url
        if path is not None and path != target.path:
            url = target.base + path
        if self._route.unix_socket is not None:
            url += f" (local socket {self._route.unix_socket!r})"
        return url

    def _fetch_extents(self):
        self._renew_proxy_view()
        path = self._route.target.path + "/extents?context=zero"

        def request(con):
            con.request("GET", path)
            resp = con.getresponse()
            self._check(resp, "GET", path, (http.client.OK,))
            return _json_reply(resp, "GET", self._where(path))

        reply = self._call("GET", path, request)
        items = []
        try:
            for ext in reply:
                items.append(
                    _copy.Extent(ext["start"], ext["length"], ext["zero"], ext.get("hole", False))
                )
        except (TypeError, KeyError) as e:
            raise Error(f"GET {self._where(path)}: bad extent in the reply: {e!r}") from None
        return items

    def _fetch_size(self):
        """The size of the ticket, from the Content-Range of a GET of its
        first byte ("bytes 0-0/SIZE", or "bytes */0" for an empty one)."""
        path = self._route.target.path

        def request(con):
            con.request("GET", path, headers={"Range": _range(0, 1)})
            resp = con.getresponse()
            self._check(
                resp,
                "GET",
                path,
                (http.client.PARTIAL_CONTENT, http.client.REQUESTED_RANGE_NOT_SATISFIABLE),
            )
            resp.read()
            content_range = resp.getheader("Content-Range", "")
            found = CONTENT_RANGE_SIZE.match(content_range)
            if found is None:
                raise Error(
                    f"GET {self._where()}: no size in the reply's Content-Range {content_range!r}"
                )
            return int(found.group(1))

        return self._call("GET", path, request)


class _RetryLog:
    """The lines about retried requests, shared by an endpoint's clones."""

    def __init__(self):
        self._lock = threading.Lock()
        self._lines = []
        self._more = 0

    def add(self, line):
        with self._lock:
            if len(self._lines) < RETRY_LOG_LIMIT:
                self._lines.append(line)
            else:
                self._more += 1

    def lines(self):
        with self._lock:
            more = [f"and {self._more} more retried requests"] if self._more else []
            return self._lines + more


class _Image:
    """What every clone shares: the size and the extent map of the ticket."""

    def __init__(self):
        self._lock = threading.Lock()
        self._size = None
        self._extents = None
        # Counts writes through any clone.
        self.generation = 0

    def size(self, endpoint):
        with self._lock:
            if self._size is None:
                if FEATURE_EXTENTS in endpoint.features and not endpoint.writable:
                    # A download needs the map anyway; its end is the size.
                    self._extents = _ExtentMap(endpoint._fetch_extents())
                    self._size = self._extents.end
                else:
                    # An upload needs no map (the daemon builds one from the
                    # allocation of the whole disk: half a second for an
                    # empty 8 TiB disk), and a server without extents has none.
                    self._size = endpoint._fetch_size()
            return self._size

    def extents(self, endpoint):
        size = self.size(endpoint)
        with self._lock:
            if self._extents is None:
                if FEATURE_EXTENTS in endpoint.features:
                    self._extents = _ExtentMap(endpoint._fetch_extents())
                else:
                    # Without extents, everything may hold data.
                    self._extents = _ExtentMap([_copy.Extent(0, size, False, False)])
            return self._extents

    def changed(self):
        # The map is the server's view at the time it was asked; after a
        # write it is asked again.
        with self._lock:
            self._extents = None
            self.generation += 1


class _ExtentMap:
    """Extents in order, with their starts for bisection."""

    def __init__(self, items):
        self.items = items
        self.starts = [ext.start for ext in items]
        self.end = items[-1].end if items else 0


class _Options:
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


class _Target:
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
        try:
            con.connect()
        except BaseException:
            con.close()
            raise
        return con

    def connect_unix(self, path):
        con = _UnixHTTPConnection(path, self.connect_timeout, self.timeout)
        try:
            con.connect()
        except BaseException:
            con.close()
            raise
        return con


class _Route:
    """How requests reach a target: over TCP, or the daemon's unix socket."""

    def __init__(self, target, unix_socket=None):
        self.target = target
        self.unix_socket = unix_socket
        self.used = USED_UNIX if unix_socket is not None else target.role

    def connect(self):
        if self.unix_socket is not None:
            return self.target.connect_unix(self.unix_socket)
        return self.target.connect()


def _open_route(target, unix_socket_mode):
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
            raise _http_error("OPTIONS", target.url, resp, body[:ERROR_TEXT_LIMIT])
        options = _Options(resp.status, resp.getheader("Allow"), body)
        route = _Route(target)
        if unix_socket_mode == "auto" and options.unix_socket and _is_local(con):
            try:
                unix_con = target.connect_unix(options.unix_socket)
            except OSError:
                # The daemon's socket may be private to its host; TCP works.
                pass
            else:
                con.close()
                con = unix_con
                route = _Route(target, options.unix_socket)
        return route, con, options
    except http.client.HTTPException as e:
        con.close()
        raise Error(f"OPTIONS {target.url}: bad reply: {_describe(e)}") from None
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


def _ssl_context(ca_file, insecure):
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise Error(
            f"Cannot load CA certificates from {ca_file!r}: {_describe(e)}: give the "
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


def _send_view(view):
    def send(con):
        con.send(view)

    return send


def _sendfile(sock, fd, offset, count):
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


def _send_file_copy(sock, fd, offset, count):
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


def _read_body(con, resp, view):
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
            raise _ConnectionLost(f"the server sent {pos} of {length} bytes")
        pos += n
    # The body is read: the connection is ready for the next request.
    resp.close()


def _read_exactly(resp, view):
    pos = 0
    length = len(view)
    while pos < length:
        n = resp.readinto(view[pos:])
        if not n:
            raise _ConnectionLost(f"the server sent {pos} of {length} bytes")
        pos += n


def _http_error(method, where, resp, text):
    """The Error for an HTTP error answer; imageio's text ends with a newline."""
    text = text.decode("utf-8", errors="replace").strip()
    return Error(f"{method} {where}: {resp.status} {resp.reason}: {text}", status=resp.status)


def _json_reply(resp, method, where):
    data = resp.read()
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError:
        raise Error(f"{method} {where}: the reply is not JSON: {data[:200]!r}") from None


def _set_read_timeout(con, timeout):
    con.read_timeout = timeout
    if con.sock is not None:
        con.sock.settimeout(timeout)


def _range(offset, length):
    return f"bytes={offset}-{offset + length - 1}"


def _positive(value):
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 1


def _describe(e):
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
