# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The SDK's own VM examples, run as scripts against the lab: add a VM from
Blank, add a disk to it, start, stop and remove it. They come from the SDK's
source distribution on PyPI (the version installed here), unpacked once into
.cache/. Only the site settings every user edits in them change: the engine
URL, password and CA file, and the names of the cluster and storage domain."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile

import pytest
from ovirtsdk4 import types

from tests.integration.conftest import ROOT
from tests.lab.test_vms import attach, upload, vms

SDK = "ovirt-engine-sdk-python"
CACHE = os.path.join(ROOT, ".cache", "sdk-examples")
GiB = 1024**3

pytestmark = pytest.mark.usefixtures("before")


@pytest.fixture(scope="module")
def examples():
    """The directory holding the installed SDK version's examples."""
    version = importlib.metadata.version(SDK)
    directory = os.path.join(CACHE, version)
    if not os.path.isdir(directory):
        sdists = os.path.join(ROOT, ".cache", "sdists")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", sdists, f"{SDK}=={version}"],
            check=True,
        )  # fmt: skip
        prefix = f"ovirt_engine_sdk_python-{version}/examples/"
        with tarfile.open(os.path.join(sdists, f"ovirt_engine_sdk_python-{version}.tar.gz")) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(directory + ".tmp", members, filter="data")
        os.replace(directory + ".tmp", directory)
    return directory


def run_example(lab, examples, tmp_path, name):
    """Run one example with the lab's site settings; it must exit 0."""
    with open(os.path.join(examples, name)) as f:
        source = f.read()
    site = {
        "'https://engine40.example.com/ovirt-engine/api'": repr(lab.engine_url),
        "'redhat123'": repr(lab.password),
        "'ca.pem'": repr(lab.ca_file),
        "'mycluster'": "'Default'",
        "'mydata'": repr(lab.file_domain),
    }
    for text, value in site.items():
        source = source.replace(text, value)
    assert "example.com" not in source and "redhat123" not in source
    script = tmp_path / name
    script.write_text(source)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr}"


def find_vm(con, name):
    found = vms(con).list(search=f"name={name}")
    return found[0] if found else None


def test_vm_examples(lab, con, examples, tmp_path, guest_image):
    assert find_vm(con, "myvm") is None

    run_example(lab, examples, tmp_path, "add_vm.py")
    vm = find_vm(con, "myvm")
    assert vm.status == types.VmStatus.DOWN
    assert vm.template.id == "00000000-0000-0000-0000-000000000000"

    run_example(lab, examples, tmp_path, "add_vm_disk.py")
    service = vms(con).vm_service(vm.id)
    (attachment,) = service.disk_attachments_service().list()
    disk = con.system_service().disks_service().disk_service(attachment.id).get()
    assert (disk.name, disk.provisioned_size, disk.format) == ("mydisk", 10 * GiB,
                                                               types.DiskFormat.COW)  # fmt: skip
    assert disk.status == types.DiskStatus.OK

    # The examples' disk is empty: give the VM the lab's guest to boot, so
    # start_vm.py sees it up once its guest agent answers.
    boot = upload(lab, con, guest_image, lab.file_domain, "sdk-examples-boot")
    attach(con, vm.id, boot.id, bootable=True, active=True)
    run_example(lab, examples, tmp_path, "start_vm.py")
    assert service.get().status == types.VmStatus.UP

    run_example(lab, examples, tmp_path, "stop_vm.py")
    assert service.get().status == types.VmStatus.DOWN
    assert lab.hooks.state()["vm_processes"] == []

    run_example(lab, examples, tmp_path, "remove_vm.py")
    assert find_vm(con, "myvm") is None
    disk_ids = {d.id for d in con.system_service().disks_service().list()}
    assert not {disk.id, boot.id} & disk_ids
