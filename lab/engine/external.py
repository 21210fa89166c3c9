# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""External disks (``Disk.external_disk``, API model 4.4): a disk whose data
comes from an image outside oVirt, given as a URL qemu understands or a local
path.

The lab honours the field as the engine patch behind the model's text does:
the disk's volume is a sparse qcow2 on a file domain whose backing is the
external image, opened read-only, so the guest's writes land in the volume
and the source is never written. The image is probed when the disk is made;
one that cannot be read is a 400 and no disk.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse

from lab.engine import errors

# The URL forms of the model's text and qemu's NBD URIs.
NBD_LEGACY = re.compile(r"^nbd:(unix:[^:]+|[^:]+:\d+)(:exportname=.*)?$")
NBD_URI = re.compile(r"^nbds?(\+tcp|\+unix)?://")
# Seconds a probe may take: qemu gives up on an unreachable server sooner.
PROBE_TIMEOUT = 30
# Seconds a VM's reads wait for a lost NBD server to come back before they
# fail; qemu keeps reconnecting after that, so a server started again on the
# same address serves the VM again.
RECONNECT_DELAY = 5


def probe(url: str, sd: dict | None) -> tuple[str, str]:
    """The (filename, format) qemu opens url as; ApiError when the lab
    cannot use it."""
    if sd is not None and sd["kind"] != "file":
        raise _refused(
            f"The external disk {url} needs a file storage domain; {sd['name']} is a block domain."
        )
    if NBD_LEGACY.match(url) or NBD_URI.match(url):
        fmt = "raw"
        command = ["qemu-img", "info", "--output", "json", "-f", fmt, url]
    elif url.startswith("/"):
        if not os.path.exists(url):
            raise _refused(f"The external disk {url} does not exist.")
        fmt = None
        command = ["qemu-img", "info", "--output", "json", "-U", url]
    else:
        raise _refused(
            f"The external disk {url} is not a URL the lab supports: use "
            "nbd:HOST:PORT[:exportname=NAME], nbd:unix:PATH[:exportname=NAME], nbd://, "
            "nbd+unix:// or a local path."
        )
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise _refused(
            f"Cannot read the external disk {url}: no answer within {PROBE_TIMEOUT} s."
        ) from None
    if proc.returncode != 0:
        reason = proc.stderr.strip().removeprefix("qemu-img: ")
        raise _refused(f"Cannot read the external disk {url}: {reason}.")
    return url, fmt or json.loads(proc.stdout)["format"]


def backing_file(url: str, fmt: str) -> str:
    """What an external disk's volume names as its backing file (an image
    of format fmt): for an NBD URL, qemu's options for it with reconnection,
    so that a VM whose NBD server went away reads again once one serves the
    same address; any other URL or path as it is."""
    server = export = None
    legacy = NBD_LEGACY.match(url)
    if legacy:
        where = legacy.group(1)
        if where.startswith("unix:"):
            server = {"type": "unix", "path": where[len("unix:") :]}
        else:
            host, port = where.rsplit(":", 1)
            server = {"type": "inet", "host": host, "port": port}
        export = (legacy.group(2) or "")[len(":exportname=") :]
    elif url.startswith(("nbd://", "nbd+tcp://", "nbd+unix://")):
        parts = urllib.parse.urlsplit(url)
        export = urllib.parse.unquote(parts.path.lstrip("/"))
        if parts.scheme != "nbd+unix":
            server = {"type": "inet", "host": parts.hostname, "port": str(parts.port or 10809)}
        elif socket := urllib.parse.parse_qs(parts.query).get("socket"):
            server = {"type": "unix", "path": socket[0]}
    if server is None:
        return url
    nbd = {"driver": "nbd", "server": server, "reconnect-delay": RECONNECT_DELAY}
    if export:
        nbd["export"] = export
    return "json:" + json.dumps({"driver": fmt, "file": nbd})


def _refused(message: str) -> errors.ApiError:
    return errors.validation(
        errors.BAD_REQUEST, f"Cannot {errors.ACTION_ADD} {errors.TYPE_DISK}. {message}"
    )
