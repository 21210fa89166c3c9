# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""ovirt.ovirt's own modules, unmodified, against the lab: clients written
for real oVirt must work with it. The collection comes from the ``ansible``
package on PyPI (its last release that ships ovirt.ovirt), unpacked once into
.cache/."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from tests.integration.conftest import ROOT

ANSIBLE_RELEASE = "ansible==9.13.0"
COLLECTION = "ansible_collections/ovirt/ovirt/"
CACHE = os.path.join(ROOT, ".cache", "ovirt-collection")


@pytest.fixture(scope="module")
def ovirt_collection():
    """A collections path holding ovirt.ovirt."""
    if not os.path.exists(os.path.join(CACHE, COLLECTION, "MANIFEST.json")):
        wheels = os.path.join(ROOT, ".cache", "wheels")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels,
             ANSIBLE_RELEASE],
            check=True,
        )  # fmt: skip
        version = ANSIBLE_RELEASE.split("==")[1]
        wheel = os.path.join(wheels, f"ansible-{version}-py3-none-any.whl")
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith(COLLECTION)]
            archive.extractall(CACHE, members)
    return CACHE


@pytest.fixture
def ovirt_ansible(ansible, ovirt_collection):
    ansible.env["ANSIBLE_COLLECTIONS_PATH"] = os.pathsep.join(
        [os.path.join(ROOT, ".collections"), ovirt_collection]
    )
    return ansible


def auth_task(lab):
    return {
        "name": "log in",
        "ovirt.ovirt.ovirt_auth": {
            "url": lab.engine_url,
            "username": lab.username,
            "password": lab.password,
            "ca_file": lab.ca_file,
        },
    }


def test_ovirt_vm_and_ovirt_disk(lab, ovirt_ansible, guest_image):
    auth = {"auth": "{{ ovirt_auth }}"}
    vm = {"name": "ovirt-ovirt-vm", "cluster": "Default"}
    create_vm = {
        "ovirt.ovirt.ovirt_vm": dict(
            auth, **vm, template="Blank", memory="256MiB", cpu_cores=1, cpu_sockets=1
        )
    }
    boot_disk = {
        "register": "boot",
        "ovirt.ovirt.ovirt_disk": dict(
            auth,
            vm_name=vm["name"],
            name="ovirt-ovirt-boot",
            upload_image_path=guest_image,
            size=str(os.path.getsize(guest_image)),
            format="cow",
            interface="virtio",
            bootable=True,
            storage_domain="nfs1",
        ),
    }
    data_disk = {
        "ovirt.ovirt.ovirt_disk": dict(
            auth,
            vm_name=vm["name"],
            name="ovirt-ovirt-data",
            size="64MiB",
            format="cow",
            interface="virtio_scsi",
            storage_domain="iscsi1",
        )
    }
    results = ovirt_ansible.playbook(
        [
            auth_task(lab),
            create_vm,
            create_vm,
            boot_disk,
            data_disk,
            data_disk,
            {"ovirt.ovirt.ovirt_vm": dict(auth, **vm, state="running", wait=True)},
            {"ovirt.ovirt.ovirt_vm": dict(auth, **vm, state="running", wait=True)},
            # Changing a running VM's disk's domain is a live storage migration.
            {
                "ovirt.ovirt.ovirt_disk": dict(
                    auth, id="{{ boot.id }}", vm_name=vm["name"], storage_domain="iscsi1"
                )
            },
            {"ovirt.ovirt.ovirt_vm": dict(auth, **vm, state="stopped", wait=True)},
            {"ovirt.ovirt.ovirt_vm": dict(auth, **vm, state="absent", wait=True)},
            {"ovirt.ovirt.ovirt_vm": dict(auth, **vm, state="absent", wait=True)},
            {"ovirt.ovirt.ovirt_auth": {"state": "absent", "ovirt_auth": "{{ ovirt_auth }}"}},
        ]
    )
    failed = [r for r in results if r.get("failed")]
    assert not failed, failed
    changed = [r.get("changed") for r in results[1:-1]]
    assert changed == [True, False, True, True, False, True, False, True, True, True, False]
    created = results[1]
    assert created["vm"]["memory"] == 256 * 1024**2
    assert created["vm"]["status"] == "down"
    con = lab.connection()
    try:
        jobs = con.system_service().jobs_service().list(search="description=Migrating*")
    finally:
        con.close()
    migration = f"Migrating Disk ovirt-ovirt-boot from nfs1 to iscsi1 of VM {vm['name']}"
    assert [j.status.value for j in jobs if j.description == migration] == ["finished"]
    # state: running waited for up (the guest agent answered), stopped for down.
    assert lab.hooks.states(created["id"]) == [
        "down", "wait_for_launch", "powering_up", "up", "powering_down", "down", "removed",
    ]  # fmt: skip
    state = lab.hooks.state()
    assert not [v for v in state["vms"] if v["name"] == vm["name"]]
    assert state["vm_processes"] == []
    # Removing the VM removed its disks.
    assert not [d for d in state["disks"] if d["alias"].startswith("ovirt-ovirt-")]
