# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures shared by every test suite: the lab (engine + host) in a temp dir."""

from __future__ import annotations

import urllib.parse

import pytest

from lab.lab import Hooks, Lab
from tests.helpers import SHUTDOWN_TIMEOUT

# Quicker transfer monitor visits than the lab's default of 1 s: state
# machines move on sooner, tests wait less.
POLL_INTERVAL = 0.5


class LabFixture:
    """What tests need of a running lab."""

    def __init__(self, lab: Lab, info: dict):
        self.lab = lab
        self.info = info
        self.dir = info["dir"]
        self.engine_url = info["engine_url"]
        parts = urllib.parse.urlsplit(self.engine_url)
        # What ovirt-img's --engine-url takes: the engine without the API path.
        self.engine_base_url = f"{parts.scheme}://{parts.netloc}"
        self.ca_file = info["ca_file"]
        self.username = info["username"]
        self.password = info["password"]
        self.password_file = info["password_file"]
        self.storage_domains = info["storage_domains"]
        self.file_domain = "nfs1"
        self.block_domain = "iscsi1"
        self.scratch_domain = "scratch"
        self.host_address = info["host"]["address"]
        self.hooks = Hooks(info["hooks_url"], self.ca_file)

    def restore(self, before: dict) -> None:
        """Undo what a failed test left: stop and remove the VMs it added,
        cancel open transfers, remove the disks it added, so the next tests
        start from a known state."""
        from ovirtsdk4 import types

        state = self.hooks.state()
        known = {d["id"] for d in before["disks"]}
        extra = [d["id"] for d in state["disks"] if d["id"] not in known]
        known_vms = {v["id"] for v in before["vms"]}
        extra_vms = [v["id"] for v in state["vms"] if v["id"] not in known_vms]
        if not state["open_transfers"] and not extra and not extra_vms:
            return
        con = self.connection()
        try:
            system = con.system_service()
            for vm_id in extra_vms:
                vm_service = system.vms_service().vm_service(vm_id)
                vm_service.stop()
                vm_service.remove(detach_only=True)
            for transfer_id in state["open_transfers"]:
                system.image_transfers_service().image_transfer_service(transfer_id).cancel()
            self.hooks.settled()
            for disk in system.disks_service().list():
                if disk.id not in known and disk.status != types.DiskStatus.LOCKED:
                    system.disks_service().disk_service(disk.id).remove()
        finally:
            con.close()

    def auth(self, **changes):
        """How to log in to the lab engine: the keys of the modules' auth
        option, which an ovirtsdk4 Connection takes too."""
        auth = {
            "url": self.engine_url,
            "username": self.username,
            "password": self.password,
            "ca_file": self.ca_file,
        }
        auth.update(changes)
        return auth

    def connection(self, **kwargs):
        """A new ovirtsdk4 connection to the lab engine; close it when done."""
        import ovirtsdk4

        return ovirtsdk4.Connection(**self.auth(**kwargs))


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory):
    """The lab's bootable guest (lab/guest.py), raw, built once per session."""
    from lab import guest

    path = str(tmp_path_factory.mktemp("guest") / "guest.raw")
    guest.build(path)
    return path


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """A lab started once per test session, stopped at the end."""
    lab = Lab(str(tmp_path_factory.mktemp("lab")))
    info = lab.start(poll_interval=POLL_INTERVAL, shutdown_timeout=SHUTDOWN_TIMEOUT)
    try:
        yield LabFixture(lab, info)
    finally:
        lab.stop()


@pytest.fixture
def con(lab):
    """An ovirtsdk4 connection to the lab engine."""
    connection = lab.connection()
    yield connection
    connection.close()


@pytest.fixture
def before(lab):
    """The lab state at the start of a test; the test must leave it so, and
    what a failed test leaves is undone for the next ones."""
    lab.hooks.clear_faults()
    state = lab.hooks.settled()
    yield state
    lab.restore(state)
