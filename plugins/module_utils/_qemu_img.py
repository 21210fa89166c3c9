# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""qemu-img: inspect, check, map and create images.

Every image qemu reads is welcome: raw, qcow2 (compressed too), vmdk, vhdx,
vdi, qed, and NBD URLs (``nbd://``, ``nbds://``, ``nbd+unix://``,
``nbds+unix://`` and qemu's legacy ``nbd:HOST:PORT`` / ``nbd:unix:PATH``).

qemu reads any file without a known header as raw, so a text file is a raw
image of its own size here too: ``info()`` says ``raw``. Only a missing
file, a directory or an image qemu cannot open is an error.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import subprocess

from ansible_collections.thinair.ovirt.plugins.module_utils import _nbd_url

QEMU_IMG = "qemu-img"


# ISO 9660 primary volume descriptor: type 1, "CD001", version 1, then an
# unused byte, at the start of sector 16 (ISO 9660 8.4, ECMA-119).
ISO_DESCRIPTOR_OFFSET = 0x8000


ISO_PRIMARY_DESCRIPTOR = b"\x01CD001\x01\x00"


# qemu-img check exit codes (qemu-img(1), "check").
CHECK_OK = 0


CHECK_CORRUPT = 2


CHECK_LEAKS = 3


CHECK_UNSUPPORTED = 63


# File names qemu's tls-creds-x509 object reads from its directory.
TLS_CA_CERT = "ca-cert.pem"


TLS_CLIENT_CERT = "client-cert.pem"


TLS_CLIENT_KEY = "client-key.pem"


# Ids of the tls-creds-x509 objects on qemu command lines: one to read a TLS
# NBD source, one for the export's own server side.
TLS_SOURCE_ID = "tls-source"


# qemu checks the server certificate against a host name even on unix
# sockets, where the URL has none.
UNIX_TLS_HOSTNAME = "localhost"


NBD_URL = re.compile(r"^nbds?(\+(unix|tcp))?:")


class QemuError(Exception):
    """qemu-img or qemu-nbd failed; the message names the image and quotes qemu."""


def is_nbd_url(image):
    """Whether image is an NBD URL rather than a local path."""
    return bool(NBD_URL.match(image))


def info(image, fmt=None, backing_chain=False, tls_certs=None, force_share=False):
    """Return ``qemu-img info --output=json`` of a local image or an NBD URL.

    backing_chain: also open the backing chain; the result gets a "chain"
        key listing the info of every image, this one first.
    tls_certs: directory with the client files of qemu's tls-creds-x509
        (ca-cert.pem, optional client-cert.pem and client-key.pem), needed
        for nbds:// URLs and servers that require TLS.
    force_share: open the image even when another process writes it (the
        result may then be slightly stale).
    """
    source = ImageSource(image, fmt, tls_certs)
    cmd = [QEMU_IMG, "info", "--output=json"]
    if backing_chain:
        cmd.append("--backing-chain")
    if force_share:
        cmd.append("--force-share")
    out = _run(cmd + source.qemu_img_args(), "cannot read image", image, source.explain)
    result = json.loads(out)
    if backing_chain:
        chain = result
        result = dict(chain[0])
        result["chain"] = chain
    return result


def check(image, fmt=None, tls_certs=None):
    """Return ``qemu-img check --output=json``; raise QemuError on corruption.

    Leaked clusters only waste space and are reported in "leaks". Formats
    without consistency checks (raw) give {"filename", "format", "checked":
    False}; format is None then unless given. Checked images have "checked":
    True besides qemu's own keys.
    """
    source = ImageSource(image, fmt, tls_certs)
    cmd = [QEMU_IMG, "check", "--output=json", *source.qemu_img_args()]
    proc = popen_run(cmd)
    err = text(proc.stderr)
    if proc.returncode == CHECK_UNSUPPORTED:
        return {"filename": image, "format": fmt, "checked": False}
    if proc.returncode == CHECK_CORRUPT:
        raise QemuError(
            "image '{}' is corrupt: qemu-img check found {} corruption(s): {}".format(
                image, _json_or_empty(proc.stdout).get("corruptions", "some"), _first_lines(err)
            )
        )
    if proc.returncode not in (CHECK_OK, CHECK_LEAKS):
        raise QemuError(f"cannot check image '{image}': {source.explain(err or exit_text(proc))}")
    result = json.loads(proc.stdout)
    result["checked"] = True
    return result


def map_extents(image, fmt):
    """Yield the ranges of ``qemu-img map --output=json`` as qemu prints
    them, one a line, so a huge map is never held whole.

    Raises QemuError when qemu-img fails; closing the generator early
    stops qemu-img.
    """
    cmd = [QEMU_IMG, "map", "--output=json", "-f", fmt, os.path.abspath(image)]
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except FileNotFoundError:
        raise QemuError(missing_tool(QEMU_IMG)) from None
    try:
        for line in proc.stdout:
            # "[{...},", "{...}," ... "{...}]"
            text = line.strip().lstrip(b"[").rstrip(b",]")
            if text:
                yield json.loads(text)
        error = proc.stderr.read().decode("utf-8", errors="replace").strip()
        if proc.wait() != 0:
            raise QemuError(
                f"cannot map image '{image}': {error or f'qemu-img exited with {proc.returncode}'}"
            )
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def create(path, fmt, size, backing=None, backing_fmt=None, preallocation=None, compat=None):
    """Create a local image with ``qemu-img create``.

    size: virtual size in bytes; None takes the backing image's size.
    backing: backing file (relative to path's directory, as qemu resolves
        it) or NBD URL; backing_fmt is probed with qemu-img info when not
        given, since qemu no longer guesses it.
    preallocation: off, metadata (qcow2), falloc or full.
    compat: qcow2 compatibility level, "0.10" or "1.1".

    Like qemu-img, replaces an existing file; when creation fails, no file
    is left at path (qemu-img removes even one that was there before).
    """
    if size is None and backing is None:
        raise QemuError(f"cannot create image '{path}': give a size or a backing file")
    cmd = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing is not None:
        if backing_fmt is None:
            backing_fmt = info(_backing_path(path, backing))["format"]
        cmd += ["-b", backing, "-F", backing_fmt]
    options = []
    if preallocation is not None:
        options.append("preallocation=" + preallocation)
    if compat is not None:
        options.append("compat=" + compat)
    if options:
        cmd += ["-o", ",".join(options)]
    cmd.append(os.path.abspath(path))
    if size is not None:
        cmd.append(str(size))
    existed = os.path.lexists(path)
    try:
        _run(cmd, "cannot create image", path)
    except BaseException:
        if not existed:
            remove_quietly(path)
        raise


def is_iso(path):
    """Whether a raw image holds an ISO 9660 file system (an installation disc)."""
    require_local_file(path, "cannot read image")
    try:
        with open(path, "rb") as f:
            f.seek(ISO_DESCRIPTOR_OFFSET)
            return f.read(len(ISO_PRIMARY_DESCRIPTOR)) == ISO_PRIMARY_DESCRIPTOR
    except OSError as e:
        raise QemuError(f"cannot read image '{path}': {e.strerror}") from None


@functools.lru_cache(maxsize=None)
def version():
    """Version of qemu-img as a tuple of ints, e.g. (7, 2, 0)."""
    # First line: "qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)".
    out = _run([QEMU_IMG, "--version"], "cannot run", QEMU_IMG)
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if not found:
        raise QemuError(f"cannot read the version of {QEMU_IMG}: {out[:200]!r}")
    return tuple(int(n) for n in found.groups())


class ImageSource:
    """What qemu opens: a local image or an NBD URL, with its format known."""

    def __init__(self, image, fmt, tls_certs, readonly=True, force_share=False):
        self.image = image
        self.url = is_nbd_url(image)
        self.readonly = readonly
        self.tls_certs = tls_certs
        self.tls = False
        self.server = None
        if self.url:
            if tls_certs is not None or image.startswith("nbds"):
                self.tls = True
                self.server = self._nbd_server_options(image, tls_certs)
        else:
            require_local_file(image, "cannot read image")
        self.format = fmt
        self._force_share = force_share

    def probe(self):
        """Fill in the format with qemu-img info when it was not given."""
        if self.format is None:
            self.format = info(self.image, tls_certs=self.tls_certs, force_share=self._force_share)[
                "format"
            ]
        return self.format

    def verify(self):
        """Fail on an image qemu-nbd would serve wrongly (corrupt, truncated)."""
        if self.probe() != "raw":
            check(self.image, fmt=self.format, tls_certs=self.tls_certs)

    def qemu_img_args(self):
        """Arguments of qemu-img info/check naming this image."""
        if self.tls:
            return [*self._object_args(), self._json(with_format=self.format is not None)]
        args = ["-f", self.format] if self.format else []
        return [*args, self._filename()]

    def qemu_nbd_args(self):
        """Arguments of qemu-nbd naming this image, format included."""
        self.probe()
        if self.tls:
            return [*self._object_args(), self._json(with_format=True)]
        return ["--format=" + self.format, self._filename()]

    def explain(self, error):
        """qemu's error text, with a hint when a TLS server wants a client certificate."""
        if (
            self.tls
            and "TLS" in error
            and not os.path.exists(os.path.join(self.tls_certs, TLS_CLIENT_CERT))
        ):
            return (
                f"{error} (the server may require a client certificate: put "
                f"{TLS_CLIENT_CERT} and {TLS_CLIENT_KEY} signed by its CA in '{self.tls_certs}')"
            )
        return error

    def direct_io(self):
        """Whether the image file can be opened with O_DIRECT."""
        if self.url:
            return False
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_DIRECT
        try:
            fd = os.open(self.image, flags)
        except OSError:
            return False
        os.close(fd)
        return True

    def _filename(self):
        # An absolute path never reads as "protocol:" to qemu.
        return self.image if self.url else os.path.abspath(self.image)

    def _object_args(self):
        directory = qemu_opt(os.path.abspath(self.tls_certs))
        return [f"--object=tls-creds-x509,id={TLS_SOURCE_ID},dir={directory},endpoint=client"]

    def _json(self, with_format):
        node = dict(self.server, driver="nbd")
        node = {"driver": self.format, "file": node} if with_format else {"file": node}
        return "json:" + json.dumps(node, sort_keys=True)

    @staticmethod
    def _nbd_server_options(image, tls_certs):
        if tls_certs is None:
            raise QemuError(
                f"cannot read image '{image}': an nbds URL needs tls_certs, a directory "
                f"holding {TLS_CA_CERT} (and {TLS_CLIENT_CERT}, {TLS_CLIENT_KEY} when the "
                "server asks for a client certificate)"
            )
        if not os.path.isfile(os.path.join(tls_certs, TLS_CA_CERT)):
            raise QemuError(
                f"cannot read image '{image}': "
                f"no {TLS_CA_CERT} in tls_certs directory '{tls_certs}'"
            )
        try:
            address = _nbd_url.parse_url(image)
        except ValueError as e:
            raise QemuError(f"cannot read image '{image}': {e}") from None
        if address.transport == "unix":
            server = {"type": "unix", "path": address.path}
            hostname = UNIX_TLS_HOSTNAME
        else:
            server = {"type": "inet", "host": address.host, "port": str(address.port)}
            hostname = address.host
        return {
            "server": server,
            "export": address.export,
            "tls-creds": TLS_SOURCE_ID,
            "tls-hostname": hostname,
        }


def _backing_path(path, backing):
    if is_nbd_url(backing) or os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(os.path.abspath(path)), backing)


def require_local_file(path, action):
    if not os.path.lexists(path):
        raise QemuError(f"{action} '{path}': no such file")
    if os.path.isdir(path):
        raise QemuError(f"{action} '{path}': it is a directory")
    if not os.path.exists(path):
        raise QemuError(f"{action} '{path}': broken symbolic link")


def popen_run(cmd):
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    except FileNotFoundError:
        raise QemuError(missing_tool(cmd[0])) from None


def _run(cmd, action, subject, explain=None):
    proc = popen_run(cmd)
    if proc.returncode != 0:
        error = text(proc.stderr) or exit_text(proc)
        if explain is not None:
            error = explain(error)
        raise QemuError(f"{action} '{subject}': {error}")
    return text(proc.stdout)


def missing_tool(name):
    return f"{name} not found: install qemu-utils (Debian, Ubuntu) or qemu-img (Fedora, EL)"


def text(data):
    return data.decode("utf-8", errors="replace").strip()


def _json_or_empty(data):
    try:
        return json.loads(data)
    except ValueError:
        return {}


def _first_lines(text, count=3):
    return "; ".join(text.splitlines()[:count])


def exit_text(proc):
    return f"{os.path.basename(proc.args[0])} exited with status {proc.returncode}"


def remove_quietly(path):
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def qemu_opt(value):
    # In qemu's option syntax a comma ends the value unless doubled.
    return value.replace(",", ",,")
