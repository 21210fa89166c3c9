# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Fixtures for the imageio data plane: the lab's hosts (real ovirt-imageio
daemons and qemu-nbd) and tickets on volumes of a file storage domain."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest

from lab.host import Host
from lab.pki import Pki
from lab.storage import StorageDomain

TICKET_TIMEOUT = 300
# The daemon answers 409 while a request on the ticket still runs; a closed
# client's last request ends within moments.
TICKET_REMOVE_ATTEMPTS = 50


class ImageioLab:
    """Two hosts, each in a lab directory of its own with a file storage
    domain, sharing one CA.

    host: reached from 127.0.0.1 at 127.0.0.2, as a remote host is.
    local_host: listens on 127.0.0.1, the client's own address, as when the
        client runs on the host (the unix socket is used then).
    """

    def __init__(self, pki, host, local_host):
        self.pki = pki
        self.host = host
        self.local_host = local_host
        self.domains = {
            h.name: StorageDomain.open(h.lab_dir, "nfs1", "file") for h in (host, local_host)
        }

    @property
    def ca_file(self):
        return self.pki.ca_cert

    def domain(self, host):
        return self.domains[host.name]

    def processes(self):
        """Pids of every process the lab runs now."""
        return set(self.host.processes()) | set(self.local_host.processes())


class Ticket:
    """An imageio ticket on a new volume, on one host, as the engine adds
    for an image transfer."""

    def __init__(self, host, volume, ops, backend, sparse):
        self.host = host
        self.volume = volume
        self.ops = list(ops)
        self.id = str(uuid.uuid4())
        self.nbd_url = None
        if backend == "nbd":
            self.nbd_url = host.start_nbd(volume, readonly="write" not in ops)
            url = self.nbd_url
        elif backend == "file":
            url = "file://" + volume.path
        else:
            raise ValueError(f"unknown backend {backend!r}")
        host.add_ticket(
            {
                "uuid": self.id,
                "size": volume.capacity,
                "ops": self.ops,
                "timeout": TICKET_TIMEOUT,
                "url": url,
                "sparse": sparse,
                "transfer_id": self.id,
            }
        )
        self.open = True

    @property
    def transfer_url(self):
        return self.host.transfer_url(self.id)

    @property
    def proxy_url(self):
        return self.host.proxy_url(self.id)

    def remove(self):
        """Remove the ticket, as the engine does when finalizing."""
        for _round in range(TICKET_REMOVE_ATTEMPTS):
            if self.host.remove_ticket(self.id):
                return
            time.sleep(0.1)
        raise AssertionError(f"ticket {self.id} is still in use")

    def close(self):
        """Remove the ticket and stop its NBD server, so the volume can be
        opened by qemu-img."""
        if not self.open:
            return
        self.open = False
        try:
            self.remove()
        finally:
            if self.nbd_url is not None:
                self.host.stop_nbd(self.nbd_url)


@pytest.fixture(scope="session")
def imageio_lab(tmp_path_factory):
    """Both lab hosts, started once for the session."""
    pki = Pki(str(tmp_path_factory.mktemp("imageio-pki")))
    # A lab directory holds one host: its run directory is the host's own.
    host = Host(
        str(tmp_path_factory.mktemp("imageio-remote")),
        pki,
        address="127.0.0.2",
        name="remote",
        remove_timeout=2,
    )
    local_host = Host(
        str(tmp_path_factory.mktemp("imageio-local")),
        pki,
        address="127.0.0.1",
        name="local",
        remove_timeout=2,
    )
    try:
        host.start()
        local_host.start()
        yield ImageioLab(pki, host, local_host)
    finally:
        local_host.stop()
        host.stop()


@pytest.fixture
def make_ticket(imageio_lab):
    """Factory: make_ticket(host, size, fmt="qcow2", ops=("write",),
    backend="nbd", sparse=True, image=None) -> Ticket.

    image: a local image whose guest data is copied into the volume first.
    Tickets, NBD servers and volumes are removed after the test.
    """
    tickets = []

    def make(host, size, fmt="qcow2", ops=("write",), backend="nbd", sparse=True, image=None):
        domain = imageio_lab.domain(host)
        volume = domain.create_volume(str(uuid.uuid4()), fmt, size, sparse)
        try:
            if image is not None:
                subprocess.run(
                    ["qemu-img", "convert", "-n", "-O", fmt, image, volume.path], check=True
                )
            ticket = Ticket(host, volume, ops, backend, sparse)
        except BaseException:
            domain.remove_volume(volume.id)
            raise
        tickets.append(ticket)
        return ticket

    yield make
    for ticket in tickets:
        try:
            ticket.close()
        finally:
            ticket.volume.domain.remove_volume(ticket.volume.id)
