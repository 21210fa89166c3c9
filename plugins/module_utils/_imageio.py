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
this process (write_from_file, _imageio_http.sendfile(2)).

One ImageioEndpoint is one keep-alive connection and is not thread safe;
``clone()`` opens another connection to the same place for another worker.
What the server told (features, limits, extents) is shared by the clones.
"""

from __future__ import annotations

import bisect
import http.client
import json
import re
import socket
import ssl
import threading
import time
from urllib.parse import urlencode

from ansible_collections.thinair.ovirt.plugins.module_utils import _copy, _imageio_http
from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import MiB
from ansible_collections.thinair.ovirt.plugins.module_utils._imageio_http import Error

# Largest request sent by readinto() and write(): the daemon moves data in
# 8 MiB steps (its backends' buffer_size), and larger requests only make a
# worker wait longer before anything overlaps.
MAX_REQUEST = 8 * MiB

# The daemon zeroes in 128 MiB steps; a larger PATCH holds the connection
# without doing more per request.
MAX_ZERO = 128 * MiB

# Buffer of zeros streamed by PUT when the server cannot zero by itself.
ZERO_BUFFER = 1 * MiB


# The ticket size in a Content-Range header (RFC 9110 14.4).
CONTENT_RANGE_SIZE = re.compile(r"^bytes (?:\d+-\d+|\*)/(\d+)$")


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


class _Retryable(Exception):
    """The request got no answer, or the daemon that came back does not
    know the ticket yet: sending it again may work."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class ImageioEndpoint:
    """An imageio ticket as a copy endpoint (see _nbd_endpoint.NbdEndpoint).

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
        context = _imageio_http.ssl_context(ca_file, insecure)
        targets = [
            _imageio_http.Target(
                transfer_url, _imageio_http.USED_HOST, context, connect_timeout, timeout
            )
        ]
        if proxy_url:
            targets.append(
                _imageio_http.Target(
                    proxy_url, _imageio_http.USED_PROXY, context, connect_timeout, timeout
                )
            )

        self.is_zero = is_zero
        self.max_request = MAX_REQUEST
        self._con = None
        self._zeros = None
        failures = []
        for target in targets:
            try:
                self._route, self._con, options = _imageio_http.open_route(target, unix_socket)
                break
            except OSError as e:
                failures.append(f"{target.role} {target.url}: {_imageio_http.describe(e)}")
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
                f"Cannot open another connection to {clone._where()}: {_imageio_http.describe(e)}"
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
                self._call(
                    "PUT", *self._put(offset + start, len(chunk), _imageio_http.send_view(chunk))
                )

    @property
    def can_write_from_file(self):
        """Whether write_from_file() sends file data without copying it: on
        a connection without TLS (the daemon's unix socket, or http)."""
        return self._route.unix_socket is not None or self._route.target.scheme == "http"

    def write_from_file(self, offset, fd, file_offset, length):
        """Write length bytes of the open file fd, from file_offset, at offset.

        Without TLS the kernel sends them from the file (_imageio_http.sendfile(2)): they
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
            if _imageio_http.FEATURE_ZERO in self.features:
                step = min(end - offset, MAX_ZERO)
                # A server that cannot flush at the end must do it now.
                msg = {
                    "op": "zero",
                    "offset": offset,
                    "size": step,
                    "flush": _imageio_http.FEATURE_FLUSH not in self.features,
                }
                self._call("PATCH", *self._patch(msg))
            else:
                step = min(end - offset, self.max_request)
                self._call("PUT", *self._put(offset, step, self._send_zeros(step)))
            offset += step

    def flush(self):
        """Make what was written durable (no-op on servers that flush every
        request)."""
        if _imageio_http.FEATURE_FLUSH in self.features:
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
        if _imageio_http.FEATURE_CHECKSUM not in self.features:
            raise Error(f"{self._where()} does not support checksums")
        self._renew_proxy_view()
        query = urlencode({"algorithm": algorithm, "block_size": block_size})
        path = self._route.target.path + "/checksum?" + query

        def request(con):
            con.request("GET", path)
            resp = con.getresponse()
            self._check(resp, "GET", path, (http.client.OK,))
            return _imageio_http.json_reply(resp, "GET", self._where(path))

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
            con.request("GET", path, headers={"Range": _imageio_http.byte_range(offset, length)})
            resp = con.getresponse()
            self._check(resp, "GET", path, (http.client.PARTIAL_CONTENT,))
            if resp.length != length:
                self._drop()
                raise Error(
                    f"GET {self._where()}: the server sent {resp.length} bytes for a "
                    f"request of {length} bytes at offset {offset}"
                )
            _imageio_http.read_body(con, resp, view)

        return path, request

    def _put(self, offset, length, send_body):
        path = self._route.target.path
        if _imageio_http.FEATURE_FLUSH in self.features:
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
                # _imageio_http.sendfile(2) cannot encrypt: over TLS (a route that moved
                # there when the daemon came back without its unix socket)
                # the data goes through memory.
                sent = _imageio_http.send_file_copy(sock, fd, file_offset, length)
            else:
                sent = _imageio_http.sendfile(sock, fd, file_offset, length)
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
            raise _Retryable(f"cannot connect: {_imageio_http.describe(e)}") from None
        con = self._con
        _imageio_http.set_read_timeout(con, timeout)
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
        except (OSError, http.client.HTTPException, _imageio_http.ConnectionLost) as e:
            self._drop()
            raise _Retryable(_imageio_http.describe(e)) from None
        finally:
            _imageio_http.set_read_timeout(con, self._route.target.timeout)

    def _reconnect(self):
        route = self._route
        try:
            return route.connect()
        except OSError:
            if route.unix_socket is None:
                raise
        # The daemon came back with another local socket (or none): find the
        # way again through its URL.
        self._route, con, _options = _imageio_http.open_route(route.target, self._unix_socket_mode)
        return con

    def _renew_proxy_view(self):
        """Open a new connection to the proxy if the image changed since
        this one was opened.

        The proxy reads the host through a backend it keeps for each client
        connection, and that backend keeps the first extent map it got. Its
        extents, and its checksums (which skip what the map says is zero),
        then _imageio_http.describe the image as it was:

            connection 1   GET (map: all zero) ... PUT data ... GET /checksum
                                                   -> checksum of zeros
            connection 2                                   GET /checksum
                                                   -> checksum of the data
        """
        if (
            self._route.used == _imageio_http.USED_PROXY
            and self._con_generation != self._image.generation
        ):
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
        text = resp.read(_imageio_http.ERROR_TEXT_LIMIT)
        if not resp.isclosed():
            # An unread body would be taken for the next reply.
            self._drop()
        raise _imageio_http.http_error(method, self._where(path), resp, text)

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
            return _imageio_http.json_reply(resp, "GET", self._where(path))

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
            con.request("GET", path, headers={"Range": _imageio_http.byte_range(0, 1)})
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
                if _imageio_http.FEATURE_EXTENTS in endpoint.features and not endpoint.writable:
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
                if _imageio_http.FEATURE_EXTENTS in endpoint.features:
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
