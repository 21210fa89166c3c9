# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""qemu-nbd servers: serve an image for the time of a block, or export it
for as long as the user wants.

- ``serve()``: a context manager for work inside one process. qemu-nbd listens
  on a unix socket in a private 0700 directory and is always stopped, and the
  directory removed, when the block ends.
- ``export_command()`` + ``start()``: a long-lived export that outlives the
  caller (the ``nbd_export`` module). No state files: ``find_exports()`` reads
  the command lines of the running qemu-nbd processes, and the socket path or
  address and port identify an export.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket as socketlib
import stat
import subprocess
import tempfile
import time
from contextlib import contextmanager

from ansible_collections.thinair.ovirt.plugins.module_utils import (
    _nbd,
    _nbd_url,
    _nbd_wire,
    _process,
    _qemu_img,
)
from ansible_collections.thinair.ovirt.plugins.module_utils._qemu_img import QemuError

QEMU_NBD = "qemu-nbd"


# glibc settings for qemu-nbd. qemu-nbd allocates a buffer for every request
# and frees it when the reply is sent; by default glibc hands such buffers
# back to the system (mmap and trim thresholds), so every request of a copy
# pays for fresh pages: page faults and zeroing cost as much system time as
# moving the data. Keeping requests' buffers (up to 32 MiB, glibc's upper
# bound for the threshold) and up to 64 MiB of free memory in the heap
# halves qemu-nbd's CPU time.
# https://www.gnu.org/software/libc/manual/html_node/Memory-Allocation-Tunables.html
QEMU_NBD_MALLOC_TUNABLES = (
    "glibc.malloc.mmap_threshold=33554432",
    "glibc.malloc.trim_threshold=67108864",
)


# Connections a private export (serve()) accepts: a copy's workers (at most 8)
# and the connection that reads the extent map.
SERVE_CONNECTIONS = 9


TLS_SERVER_FILES = (_qemu_img.TLS_CA_CERT, "server-cert.pem", "server-key.pem")


TLS_EXPORT_ID = "tls-export"


# /proc/net/unix: a listening socket carries __SO_ACCEPTCON in its flags.
SO_ACCEPTCON = 1 << 16


# qemu-nbd's options (qemu-nbd.c, qemu 7.2): short name -> long name, and
# the long names that take an argument. Used to read command lines of
# running servers, ours and others'.
QEMU_NBD_SHORT = {
    "b": "bind",
    "o": "offset",
    "p": "port",
    "r": "read-only",
    "s": "snapshot",
    "n": "nocache",
    "c": "connect",
    "d": "disconnect",
    "v": "verbose",
    "k": "socket",
    "e": "shared",
    "f": "format",
    "t": "persistent",
    "l": "load-snapshot",
    "x": "export-name",
    "T": "trace",
    "D": "description",
    "A": "allocation-depth",
    "B": "bitmap",
    "L": "list",
    "h": "help",
    "V": "version",
}


QEMU_NBD_WITH_ARGUMENT = frozenset(
    (
        "bind",
        "offset",
        "port",
        "connect",
        "socket",
        "shared",
        "format",
        "load-snapshot",
        "export-name",
        "trace",
        "description",
        "bitmap",
        "cache",
        "aio",
        "discard",
        "detect-zeroes",
        "object",
        "tls-creds",
        "tls-authz",
        "tls-hostname",
        "pid-file",
        "selinux-label",
    )
)


class Export:
    """A qemu-nbd server: where it listens and what it serves.

    Built from the qemu-nbd command line, so it describes running servers
    (pid set) and servers about to start (pid None) the same way.
    """

    def __init__(self, argv, pid=None):
        options, image = _parse_qemu_nbd_argv(argv)
        self.argv = list(argv)
        self.pid = pid
        self.image = image
        self.socket = options.get("socket")
        if self.socket is None:
            self.address = options.get("bind", "0.0.0.0")
            self.port = _int_or_text(options.get("port", _nbd_wire.NBD_DEFAULT_PORT))
        else:
            self.address = None
            self.port = None
        self.export_name = options.get("export-name", "")
        self.format = options.get("format") or _json_driver(image)
        self.readonly = "read-only" in options
        self.shared = _int_or_text(options.get("shared", 1))
        self.tls = "tls-creds" in options
        self.tls_certs = _tls_dir(options.get("objects", ()), options.get("tls-creds"))
        self.url = _export_url(self.socket, self.address, self.port, self.export_name, self.tls)

    @property
    def endpoint(self):
        """("unix", path) or ("tcp", address, port): what identifies an export."""
        if self.socket is not None:
            return ("unix", self.socket)
        return ("tcp", self.address, self.port)

    def __repr__(self):
        return f"<Export {self.url} pid={self.pid} image={self.image!r} format={self.format}>"


@contextmanager
def serve(image, fmt=None, timeout=10.0, tls_certs=None, checked=False, **options):
    """Serve image with qemu-nbd on a private unix socket; yield an Export.

    fmt: probed with qemu-img info when not given; qemu-nbd itself is
        always told the format, so it never probes a raw image.
    tls_certs: client credentials directory to read a TLS NBD source.
    options: how to export, as _command() takes them; shared defaults to
        SERVE_CONNECTIONS here.

    Non-raw images are checked with qemu-img check first (unless checked
    says the caller did), so a truncated or corrupt image fails here instead
    of serving zeros. qemu-nbd is stopped
    and the directory removed when the block ends, whatever ends it; if the
    calling thread dies without unwinding, the kernel stops qemu-nbd.
    """
    options.setdefault("shared", SERVE_CONNECTIONS)
    source = _qemu_img.ImageSource(image, fmt, tls_certs, readonly=options.get("readonly", True))
    if not checked:
        source.verify()
    directory = tempfile.mkdtemp(prefix="thinair-qemu-nbd-")
    try:
        sock = os.path.join(directory, "sock")
        log = os.path.join(directory, "qemu-nbd.log")
        argv = _command(source, ["--socket=" + sock], **options)
        with open(log, "wb") as stderr:
            proc = _popen(
                argv,
                env=_qemu_nbd_environment(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=_process.die_with_parent_hook(),
            )
        try:
            export = Export(argv, pid=proc.pid)
            _wait_until_ready(proc, export.url, log, source, timeout)
            yield export
        finally:
            _terminate(proc, timeout)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def export_command(
    image,
    fmt=None,
    address="127.0.0.1",
    port=_nbd_wire.NBD_DEFAULT_PORT,
    socket=None,
    tls_certs=None,
    **options,
):
    """Return the qemu-nbd command line of a long-lived export of image.

    The same inputs give the same command line, which is how a running
    export is recognised (compare with Export.argv). socket: unix socket
    path, used instead of address and port. tls_certs: directory with
    qemu's server files (ca-cert.pem, server-cert.pem, server-key.pem);
    clients then need a certificate signed by that CA (qemu verifies
    peers). options: how to export, as _command() takes them. Reads the
    image (format probe) but changes nothing.
    """
    if image.startswith("nbds"):
        raise QemuError(
            f"cannot export image '{image}': exporting a TLS NBD source is not supported"
        )
    source = _qemu_img.ImageSource(
        image, fmt, None, readonly=options.get("readonly", True), force_share=True
    )
    if socket is not None:
        if not os.path.isabs(socket):
            raise QemuError(f"socket must be an absolute path, not '{socket}'")
        endpoint = ["--socket=" + os.path.normpath(socket)]
    else:
        if not 0 < port < 65536:
            raise QemuError(f"port must be between 1 and 65535, not {port}")
        endpoint = ["--bind=" + address, f"--port={port}"]
    if tls_certs is not None:
        endpoint += _server_tls_args(tls_certs)
    return _command(source, endpoint, daemon=True, **options)


def verify(export):
    """Fail when qemu-nbd would serve export's image wrongly (corrupt, truncated).

    Checks images other than raw with qemu-img check.
    """
    _qemu_img.ImageSource(export.image, export.format, None, readonly=export.readonly).verify()


def start(argv, timeout=10.0, verify_image=True):
    """Start the export export_command() described; return it once it listens.

    qemu-nbd runs as a daemon in its own session and outlives the caller.
    The image is verified first (see verify()) unless verify_image is False. A unix
    socket path must be free: a stale socket is replaced, anything else is
    refused.
    """
    export = Export(argv)
    if export.socket is not None:
        _claim_socket_path(export.socket)
    if verify_image:
        verify(export)
    try:
        proc = subprocess.run(
            argv,
            env=_qemu_nbd_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd="/",
            check=False,
            timeout=timeout,
        )
    except FileNotFoundError:
        raise QemuError(_qemu_img.missing_tool(QEMU_NBD)) from None
    except subprocess.TimeoutExpired:
        for late in _running_with_argv(argv):
            stop(late.pid, timeout)
        raise QemuError(
            f"cannot export image '{export.image}': qemu-nbd did not start within {timeout} s"
        ) from None
    if proc.returncode != 0:
        # qemu-nbd binds its socket before it opens the image.
        if export.socket is not None:
            _remove_stale_socket(export.socket)
        error = _qemu_img.text(proc.stderr) or _qemu_img.exit_text(proc)
        raise QemuError(f"cannot export image '{export.image}': {error}")
    started = [e for e in _running_with_argv(argv) if _process.is_session_leader(e.pid)]
    if not started:
        raise QemuError(
            f"cannot export image '{export.image}': qemu-nbd started and exited at once"
        )
    return started[0]


def find_exports():
    """Return an Export for every running qemu-nbd server on this machine."""
    exports = []
    for pid, argv in _qemu_nbd_processes():
        options = _parse_qemu_nbd_argv(argv)[0]
        # qemu-nbd --connect and --list are NBD clients, not servers.
        if "connect" in options or "list" in options:
            continue
        exports.append(Export(argv, pid=pid))
    return exports


def find_export(endpoint):
    """Return the running Export listening on endpoint (see Export.endpoint), or None."""
    for export in find_exports():
        if export.endpoint == endpoint:
            return export
    return None


def stop(pid, timeout=10.0):
    """Stop the qemu-nbd server pid, wait until it is gone, remove its unix socket.

    Returns False when no such server runs (already stopped), True otherwise.
    Refuses to signal a process that is not qemu-nbd.
    """
    argv = _process.cmdline(pid)
    if not argv:
        return False
    if os.path.basename(argv[0]) != QEMU_NBD:
        raise QemuError("process {} is not qemu-nbd: {}".format(pid, " ".join(argv)))
    export = Export(argv, pid=pid)
    _process.send_signal(pid, signal.SIGTERM)
    if not _process.wait_gone(pid, timeout):
        _process.send_signal(pid, signal.SIGKILL)
        if not _process.wait_gone(pid, timeout):
            raise QemuError(f"qemu-nbd process {pid} did not exit after SIGKILL")
    # qemu-nbd removes its socket on SIGTERM, not when it is killed.
    if export.socket is not None:
        _remove_stale_socket(export.socket)
    return True


def _command(
    source,
    endpoint,
    daemon=False,
    readonly=True,
    shared=8,
    export_name="",
    allocation_depth=None,
    bitmap=None,
    cache=None,
    aio=None,
    discard=True,
    detect_zeroes=None,
):
    """Build a qemu-nbd command line in one canonical form (--long=value).

    shared: how many clients at once (0: no limit).
    allocation_depth: report qemu:allocation-depth; default on for all
        formats but raw.
    bitmap: a dirty bitmap of the image to export as qemu:dirty-bitmap.
    cache, aio: by default a writable export of a file that supports O_DIRECT
        writes with none + native (straight to storage, as vdsm runs
        qemu-nbd); a read-only export reads through the page cache
        (writeback + threads), as qemu-img convert reads its source: the
        kernel reads ahead, and data already in the cache is not read from
        the storage again.
    discard, detect_zeroes: for writable exports: pass discard requests down
        (unmap), and turn zero writes into zero requests ("unmap" with
        discard, else "on").
    """
    fmt = source.probe()
    if cache is None:
        cache = "none" if not readonly and source.direct_io() else "writeback"
    if aio is None:
        aio = "native" if cache == "none" and not source.url else "threads"
    if allocation_depth is None:
        allocation_depth = fmt != "raw"
    if shared < 0:
        raise QemuError(f"shared must be 0 (no limit) or more connections, not {shared}")
    argv = [QEMU_NBD]
    if daemon:
        argv.append("--fork")
    argv += ["--persistent", f"--shared={shared}", "--export-name=" + export_name]
    argv += endpoint
    if readonly:
        argv.append("--read-only")
    else:
        argv.append("--discard=" + ("unmap" if discard else "ignore"))
        if detect_zeroes is None:
            detect_zeroes = "unmap" if discard else "on"
        argv.append("--detect-zeroes=" + detect_zeroes)
    argv += ["--cache=" + cache, "--aio=" + aio]
    if allocation_depth:
        argv.append("--allocation-depth")
    if bitmap is not None:
        argv.append("--bitmap=" + bitmap)
    return argv + source.qemu_nbd_args()


def _server_tls_args(tls_certs):
    if not os.path.isabs(tls_certs):
        raise QemuError(f"tls_certs must be an absolute path, not '{tls_certs}'")
    if not os.path.isdir(tls_certs):
        raise QemuError(f"tls_certs directory '{tls_certs}' does not exist")
    missing = [n for n in TLS_SERVER_FILES if not os.path.isfile(os.path.join(tls_certs, n))]
    if missing:
        raise QemuError(
            "tls_certs directory '{}' lacks {}: it needs {}".format(
                tls_certs, ", ".join(missing), ", ".join(TLS_SERVER_FILES)
            )
        )
    directory = _qemu_img.qemu_opt(os.path.normpath(tls_certs))
    return [
        f"--object=tls-creds-x509,id={TLS_EXPORT_ID},dir={directory},endpoint=server",
        "--tls-creds=" + TLS_EXPORT_ID,
    ]


def _export_url(sock, address, port, export_name, tls):
    if sock is not None:
        return _nbd_url.format_url(_nbd_url.Address("unix", path=sock, export=export_name, tls=tls))
    # A wildcard address listens everywhere; clients need a real name.
    if address in ("0.0.0.0", "::", ""):
        address = socketlib.getfqdn()
    return _nbd_url.format_url(
        _nbd_url.Address("tcp", host=address, port=port, export=export_name, tls=tls)
    )


def _parse_qemu_nbd_argv(argv):
    """Return ({long option: value}, image) of a qemu-nbd command line.

    Flags map to True; every --object value is kept in "objects".
    """
    options = {"objects": []}
    positional = []
    args = iter(argv[1:])
    for arg in args:
        if arg == "--":
            positional.extend(args)
            break
        if arg.startswith("--"):
            name, sep, value = arg[2:].partition("=")
            if name in QEMU_NBD_WITH_ARGUMENT and not sep:
                value = next(args, "")
            _set_option(options, name, value if name in QEMU_NBD_WITH_ARGUMENT else True)
        elif arg.startswith("-") and len(arg) > 1:
            letters = arg[1:]
            while letters:
                name = QEMU_NBD_SHORT.get(letters[0], letters[0])
                letters = letters[1:]
                if name in QEMU_NBD_WITH_ARGUMENT:
                    value = letters or next(args, "")
                    _set_option(options, name, value)
                    break
                _set_option(options, name, True)
        else:
            positional.append(arg)
    return options, (positional[-1] if positional else None)


def _set_option(options, name, value):
    if name == "object":
        options["objects"].append(value)
    else:
        options[name] = value


def _int_or_text(value):
    # Other tools' command lines may name a port by service name.
    try:
        return int(value)
    except ValueError:
        return value


def _json_driver(image):
    if image and image.startswith("json:"):
        try:
            return json.loads(image[5:]).get("driver")
        except (ValueError, AttributeError):
            return None
    return None


def _tls_dir(objects, creds_id):
    if creds_id is None:
        return None
    for obj in objects:
        fields = _split_qemu_opts(obj)
        if fields.get("id") == creds_id:
            return fields.get("dir")
    return None


def _split_qemu_opts(text):
    """Split qemu's "a=b,c=d" option syntax, where ",," is a literal comma."""
    fields = {}
    for part in re.split(r"(?<!,),(?!,)", text.replace(",,", "\0")):
        key, value = part.split("=", 1) if "=" in part else (part, "")
        fields[key] = value.replace("\0", ",")
    return fields


def _claim_socket_path(path):
    """Make path free for a new server: refuse files and live sockets."""
    if not os.path.lexists(path):
        if not os.path.isdir(os.path.dirname(path)):
            raise QemuError(
                f"cannot create socket '{path}': directory '{os.path.dirname(path)}' does not exist"
            )
        return
    if not _is_socket(path):
        raise QemuError(f"refusing to replace '{path}': it exists and is not a socket")
    if _is_listening(path):
        owner = find_export(("unix", path))
        raise QemuError(
            "socket '{}' is in use by {}; stop it first".format(
                path, "another process" if owner is None else f"qemu-nbd pid {owner.pid}"
            )
        )
    _qemu_img.remove_quietly(path)


def _remove_stale_socket(path):
    if _is_socket(path) and not _is_listening(path):
        _qemu_img.remove_quietly(path)


def _is_socket(path):
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_listening(path):
    """Whether a socket listens on the unix path (from /proc/net/unix)."""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            # Num RefCount Protocol Flags Type St Inode Path
            fields = line.split(None, 7)
            listening = len(fields) == 8 and int(fields[3], 16) & SO_ACCEPTCON
            if listening and fields[7].rstrip("\n") == path:
                return True
    return False


def _wait_until_ready(proc, url, log, source, timeout):
    """Return once the export answers an NBD handshake.

    A listening socket is not enough: qemu-nbd binds its socket before it
    opens the image, and may still fail to open it.
    """
    image = source.image
    deadline = time.monotonic() + timeout
    pause = _process.POLL_START
    while True:
        if proc.poll() is not None:
            error = source.explain(_read_log(log) or _qemu_img.exit_text(proc))
            raise QemuError(f"cannot serve image '{image}': {error}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QemuError(
                f"cannot serve image '{image}': qemu-nbd was not ready within {timeout} s"
            )
        try:
            _nbd.Client(url, meta_contexts=(), connect_timeout=remaining).close()
            return
        except _nbd.Error:
            time.sleep(pause)
            pause = min(pause * 2, _process.POLL_MAX)


def _terminate(proc, timeout):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _qemu_nbd_processes():
    """Yield (pid, argv) of the live qemu-nbd processes."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        argv = _process.cmdline(int(name))
        if argv and os.path.basename(argv[0]) == QEMU_NBD:
            yield int(name), argv


def _running_with_argv(argv):
    return [Export(a, pid=p) for p, a in _qemu_nbd_processes() if a == list(argv)]


def _qemu_nbd_environment():
    """This process's environment with QEMU_NBD_MALLOC_TUNABLES; tunables the
    user set come later and win."""
    env = dict(os.environ)
    tunables = list(QEMU_NBD_MALLOC_TUNABLES)
    if env.get("GLIBC_TUNABLES"):
        tunables.append(env["GLIBC_TUNABLES"])
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env


def _popen(argv, **kwargs):
    try:
        return subprocess.Popen(argv, **kwargs)
    except FileNotFoundError:
        raise QemuError(_qemu_img.missing_tool(argv[0])) from None


def _read_log(path):
    try:
        with open(path, "rb") as f:
            return _qemu_img.text(f.read())
    except OSError:
        return ""
