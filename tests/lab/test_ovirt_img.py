# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The unmodified ``ovirt-img`` (ovirt-imageio 2.5.1) against the lab: upload
and download raw, qcow2, compressed qcow2 and ISO images on the file and the
block domain; every round trip is checked with ``qemu-img compare``."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import uuid

import ovirtsdk4 as sdk
import pytest
from ovirt_imageio import client
from ovirtsdk4 import types

MiB = 1024**2
IMAGE_SIZE = 24 * MiB
OVIRT_IMG = os.path.join(os.path.dirname(sys.executable), "ovirt-img")

# Data, zeros and unaligned edges.
WRITES = [(0, MiB, 0x11), (5 * MiB + 4096, 3 * MiB, 0x22), (IMAGE_SIZE - 2 * MiB, 2 * MiB, 0x33)]

# ISO 9660 layout: 2048-byte sectors, descriptors from sector 16.
SECTOR = 2048
PVD_SECTOR = 16
ISO_FILE = b"DATA.BIN;1"

# Every test starts from a settled lab and must leave it so (conftest.py).
pytestmark = pytest.mark.usefixtures("before")


# Images.


def make_image(path, fmt, compressed=False):
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, str(IMAGE_SIZE)], check=True)
    cmds = []
    for offset, length, byte in WRITES:
        cmds += ["-c", f"write -P {byte:#x} {offset} {length}"]
    subprocess.run(["qemu-io", "-f", fmt, *cmds, path], check=True, stdout=subprocess.DEVNULL)
    if compressed:
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", path, path + ".c"], check=True)
        os.replace(path + ".c", path)
    return path


def both16(n):
    return struct.pack("<H", n) + struct.pack(">H", n)


def both32(n):
    return struct.pack("<I", n) + struct.pack(">I", n)


def directory_record(extent, size, name, directory):
    """ISO 9660 directory record (ECMA-119 9.1)."""
    length = 33 + len(name) + (len(name) + 1) % 2
    record = (
        bytes([length, 0])
        + both32(extent)
        + both32(size)
        + bytes(7)  # recording date: not specified
        + bytes([2 if directory else 0, 0, 0])
        + both16(1)  # volume sequence number
        + bytes([len(name)])
        + name
    )
    return record.ljust(length, b"\0")


def make_iso(path, data_size=6 * MiB):
    """A small ISO 9660 image: one file of patterned data in the root directory.

    Sectors: 16 primary volume descriptor, 17 terminator, 18/19 path tables
    (little and big endian), 20 root directory, 21... the file.
    """
    root_sector, file_sector = 20, 21
    total = file_sector + data_size // SECTOR
    root = (
        directory_record(root_sector, SECTOR, b"\0", True)
        + directory_record(root_sector, SECTOR, b"\1", True)
        + directory_record(file_sector, data_size, ISO_FILE, False)
    )
    pvd = bytearray(SECTOR)
    pvd[0:8] = b"\x01CD001\x01\x00"
    pvd[8:40] = b"LINUX".ljust(32)
    pvd[40:72] = b"THINAIR_LAB".ljust(32)
    pvd[80:88] = both32(total)
    pvd[120:124] = both16(1)
    pvd[124:128] = both16(1)
    pvd[128:132] = both16(SECTOR)
    pvd[132:140] = both32(10)
    pvd[140:144] = struct.pack("<I", 18)
    pvd[148:152] = struct.pack(">I", 19)
    pvd[156:190] = directory_record(root_sector, SECTOR, b"\0", True)
    pvd[190:813] = b" " * (813 - 190)
    for offset in (813, 830, 847, 864):  # dates: not specified
        pvd[offset : offset + 17] = b"0" * 16 + b"\0"
    pvd[881] = 1
    terminator = b"\xffCD001\x01".ljust(SECTOR, b"\0")
    path_table_le = bytes([1, 0]) + struct.pack("<I", root_sector) + struct.pack("<H", 1) + b"\0\0"
    path_table_be = bytes([1, 0]) + struct.pack(">I", root_sector) + struct.pack(">H", 1) + b"\0\0"
    with open(path, "wb") as f:
        f.write(bytes(PVD_SECTOR * SECTOR))
        for sector in (pvd, terminator, path_table_le, path_table_be, root):
            f.write(bytes(sector).ljust(SECTOR, b"\0"))
        pattern = bytes(range(256)) * (SECTOR // 256)
        for _sector in range(data_size // SECTOR):
            f.write(pattern)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    top = tmp_path_factory.mktemp("images")
    return {
        "raw": make_image(str(top / "raw.img"), "raw"),
        "qcow2": make_image(str(top / "qcow2.img"), "qcow2"),
        "compressed": make_image(str(top / "compressed.img"), "qcow2", compressed=True),
        "iso": make_iso(str(top / "image.iso")),
    }


# Helpers.


def ovirt_img(lab, tmp_path, command, *args):
    """Run ovirt-img with the lab's engine and credentials; its CompletedProcess."""
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))
    cmd = [
        OVIRT_IMG,
        command,
        "--engine-url", lab.engine_base_url,
        "--username", lab.username,
        "--password-file", lab.password_file,
        "--cafile", lab.ca_file,
        *args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def compare(image, other):
    proc = subprocess.run(
        ["qemu-img", "compare", image, other], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def assert_clean(lab, before):
    state = lab.hooks.settled()
    assert {d["id"] for d in state["disks"]} == {d["id"] for d in before["disks"]}
    assert sorted(state["processes"]) == sorted(before["processes"])


# Tests.


def test_iso_is_iso9660(images):
    # The fixture image must be what ovirt-img and blkid take for an ISO.
    out = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", images["iso"]],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "iso9660"


@pytest.mark.parametrize("domain", ["nfs1", "iscsi1"])
@pytest.mark.parametrize("kind", ["raw", "qcow2", "compressed", "iso"])
def test_round_trip(lab, con, images, tmp_path, before, kind, domain):
    image = images[kind]
    disk_id = str(uuid.uuid4())
    up = ovirt_img(lab, tmp_path, "upload-disk", "-s", domain, "--disk-id", disk_id, image)
    assert up.returncode == 0, up.stderr

    disk = con.system_service().disks_service().disk_service(disk_id).get()
    assert disk.status == types.DiskStatus.OK
    assert disk.storage_domains[0].id == lab.storage_domains[domain]["id"]
    if kind == "iso":
        assert disk.content_type == types.DiskContentType.ISO
        assert (disk.format, disk.sparse) == (types.DiskFormat.RAW, False)
    else:
        assert disk.content_type == types.DiskContentType.DATA
        assert (disk.format, disk.sparse) == (types.DiskFormat.COW, True)
        assert disk.backup == types.DiskBackup.INCREMENTAL
    compare(image, lab.hooks.volume(disk_id)["qemu_json"])

    target = str(tmp_path / "download.qcow2")
    down = ovirt_img(lab, tmp_path, "download-disk", disk_id, target)
    assert down.returncode == 0, down.stderr
    compare(image, target)
    assert client.info(target)["format"] == "qcow2"

    con.system_service().disks_service().disk_service(disk_id).remove()
    assert_clean(lab, before)


@pytest.mark.parametrize("domain,extra", [("nfs1", []), ("iscsi1", ["--preallocated"])])
def test_raw_disk(lab, con, images, tmp_path, before, domain, extra):
    image = images["qcow2"]
    disk_id = str(uuid.uuid4())
    up = ovirt_img(
        lab, tmp_path, "upload-disk", "-s", domain, "-f", "raw", *extra, "--disk-id", disk_id, image
    )
    assert up.returncode == 0, up.stderr
    disk = con.system_service().disks_service().disk_service(disk_id).get()
    assert disk.format == types.DiskFormat.RAW
    assert disk.sparse == (not extra)

    target = str(tmp_path / "download.raw")
    down = ovirt_img(lab, tmp_path, "download-disk", "-f", "raw", disk_id, target)
    assert down.returncode == 0, down.stderr
    compare(image, target)
    if domain == "nfs1":
        assert lab.hooks.checksum(disk_id) == client.checksum(image)

    con.system_service().disks_service().disk_service(disk_id).remove()
    assert_clean(lab, before)


def test_raw_sparse_on_block_refused(lab, images, tmp_path, before):
    up = ovirt_img(lab, tmp_path, "upload-disk", "-s", "iscsi1", "-f", "raw", images["raw"])
    assert up.returncode == 1
    assert (
        "Disk configuration (RAW Sparse backup-None) is incompatible with the storage domain type"
        in up.stderr
    )
    assert_clean(lab, before)


def test_wrong_password(lab, images, tmp_path, before):
    password = tmp_path / "password"
    password.write_text("wrong\n")
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))
    up = subprocess.run(
        [
            OVIRT_IMG, "upload-disk",
            "--engine-url", lab.engine_base_url,
            "--username", lab.username,
            "--password-file", str(password),
            "--cafile", lab.ca_file,
            "-s", "nfs1", images["raw"],
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert up.returncode == 1
    assert "The username or password is incorrect" in up.stderr
    assert_clean(lab, before)


def test_download_missing_disk(lab, tmp_path, before):
    target = tmp_path / "missing.qcow2"
    down = ovirt_img(lab, tmp_path, "download-disk", str(uuid.uuid4()), str(target))
    assert down.returncode == 1
    assert not target.exists()
    assert_clean(lab, before)


def test_sdk_sees_ovirt_img_disk(lab, con, images, tmp_path, before):
    # A disk ovirt-img uploaded is found by name through the SDK, as
    # ovirt.ovirt looks disks up.
    name = f"img-{uuid.uuid4().hex[:8]}"
    up = ovirt_img(lab, tmp_path, "upload-disk", "-s", "nfs1", "--name", name, images["qcow2"])
    assert up.returncode == 0, up.stderr
    disks = con.system_service().disks_service().list(search=f'name="{name}"')
    assert len(disks) == 1
    assert disks[0].description == "Uploaded by ovirt-img"
    con.system_service().disks_service().disk_service(disks[0].id).remove()
    with pytest.raises(sdk.NotFoundError):
        con.system_service().disks_service().disk_service(disks[0].id).get()
    assert_clean(lab, before)
