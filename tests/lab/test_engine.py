# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lab engine against the unmodified oVirt SDK (ovirtsdk4) and the
ovirt_imageio client: SSO, inventory, disks, image transfers, jobs, faults,
and the lab's life cycle. Moved data is checked with qemu-img compare and
imageio checksums; every failure case checks that the lab is left as it was.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import ovirtsdk4 as sdk
import pytest
from ovirt_imageio import client
from ovirt_imageio._internal import http as imageio_http
from ovirtsdk4 import types

from lab.host.process import alive
from lab.lab import Hooks, Lab
from lab.pki import Pki
from tests.helpers import wait_for

MiB = 1024**2
IMAGE_SIZE = 20 * MiB
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

UPLOAD = types.ImageTransferDirection.UPLOAD
DOWNLOAD = types.ImageTransferDirection.DOWNLOAD
Phase = types.ImageTransferPhase

# Guest data at odd offsets, zeros in between.
WRITES = ((0, MiB, 0x11), (3 * MiB + 65536, 2 * MiB, 0x22), (IMAGE_SIZE - MiB, MiB, 0x33))

# Every test starts from a settled lab and must leave it so (conftest.py).
pytestmark = pytest.mark.usefixtures("before")


# Helpers.


def make_image(path, fmt="raw", size=IMAGE_SIZE, writes=WRITES, compressed=False, options=()):
    """A qemu image with data at the given (offset, length, byte) places."""
    extra = ["-o", ",".join(options)] if options else []
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, *extra, str(path), str(size)], check=True
    )
    cmds = []
    for offset, length, byte in writes:
        cmds += ["-c", f"write -P {byte:#x} {offset} {length}"]
    subprocess.run(["qemu-io", "-f", fmt, *cmds, str(path)], check=True, stdout=subprocess.DEVNULL)
    if compressed:
        tmp = f"{path}.tmp"
        subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(path), tmp], check=True)
        os.replace(tmp, path)
    return str(path)


def compare_volume(lab, disk_id, image):
    """qemu-img compare of a local image with the volume behind a disk."""
    volume = lab.hooks.volume(disk_id)
    proc = subprocess.run(
        ["qemu-img", "compare", image, volume["qemu_json"]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # A checksum covers the whole volume: comparable only at equal sizes (a
    # raw volume on block storage has the size of its LV).
    if volume["capacity"] == client.info(image)["virtual-size"]:
        assert lab.hooks.checksum(disk_id) == client.checksum(image)


def system(con):
    return con.system_service()


def disk_service(con, disk_id):
    return system(con).disks_service().disk_service(disk_id)


def transfer_service(con, transfer_id):
    return system(con).image_transfers_service().image_transfer_service(transfer_id)


def disk_exists(con, disk_id):
    try:
        disk_service(con, disk_id).get()
        return True
    except sdk.NotFoundError:
        return False


def add_disk(con, storage_domain, size=IMAGE_SIZE, fmt=types.DiskFormat.COW, sparse=True,
             backup=None, wait=True, query=None, **kwargs):  # fmt: skip
    disk = (
        system(con)
        .disks_service()
        .add(
            types.Disk(
                name=kwargs.pop("name", f"test-{uuid.uuid4().hex[:8]}"),
                format=fmt,
                provisioned_size=size,
                sparse=sparse,
                backup=backup,
                storage_domains=[types.StorageDomain(name=storage_domain)],
                **kwargs,
            ),
            query=query,
        )
    )
    if wait:
        wait_disk_status(con, disk.id, types.DiskStatus.OK)
    return disk


def wait_disk_status(con, disk_id, status, timeout=30):
    return wait_for(
        lambda: (d := disk_service(con, disk_id).get()).status == status and d,
        timeout,
        f"disk {disk_id} {status}",
    )


def start_transfer(con, disk_id, direction=UPLOAD, fmt=types.DiskFormat.RAW, **kwargs):
    transfer = (
        system(con)
        .image_transfers_service()
        .add(
            types.ImageTransfer(
                disk=types.Disk(id=disk_id), direction=direction, format=fmt, **kwargs
            )
        )
    )
    # Setup runs inside the POST, as the engine does for an existing disk.
    assert transfer.phase == Phase.TRANSFERRING
    return transfer


def wait_phase(con, transfer_id, phase, timeout=30):
    service = transfer_service(con, transfer_id)
    return wait_for(
        lambda: (t := service.get()).phase == phase and t,
        timeout,
        f"transfer {transfer_id} {phase}",
    )


def finalize(con, transfer, phase=Phase.FINISHED_SUCCESS):
    transfer_service(con, transfer.id).finalize()
    return wait_phase(con, transfer.id, phase)


def write_raw(lab, transfer, data, offset=0):
    """PUT bytes as they are through a transfer, as a file-backend upload of a
    qcow2 image does (the imageio client would send guest data instead)."""
    url = urllib.parse.urlsplit(transfer.transfer_url)
    context = ssl.create_default_context(cafile=lab.ca_file)
    con = http.client.HTTPSConnection(url.hostname, url.port, context=context)
    try:
        con.request(
            "PUT",
            url.path,
            body=data,
            headers={"Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"},
        )
        reply = con.getresponse()
        body = reply.read()
        assert reply.status == 200, body
    finally:
        con.close()


def assert_clean(lab, before):
    """The lab holds the same disks as before, all ok, the same processes, and
    no transfer, ticket, NBD server or running job."""
    state = lab.hooks.settled()
    assert {d["id"] for d in state["disks"]} == {d["id"] for d in before["disks"]}
    assert all(d["status"] == "ok" for d in state["disks"])
    assert sorted(state["processes"]) == sorted(before["processes"])


# Fixtures.


@pytest.fixture
def raw_image(tmp_path):
    return make_image(tmp_path / "image.raw", "raw")


@pytest.fixture
def qcow2_image(tmp_path):
    return make_image(tmp_path / "image.qcow2", "qcow2")


# SSO, the API root and the inventory.


def test_api_root(con):
    assert con.test(raise_exception=True)
    api = system(con).get()
    assert api.product_info.name == "oVirt Engine"
    assert (api.product_info.version.major, api.product_info.version.minor) == (4, 5)


def test_wrong_password(lab, before):
    con = lab.connection(password="not-the-password")
    with pytest.raises(sdk.AuthError, match=r"access_denied.*incorrect"):
        con.test(raise_exception=True)
    con.close(logout=False)
    assert_clean(lab, before)


def test_untrusted_ca(lab, tmp_path, before):
    other = Pki(str(tmp_path / "other-pki"))
    con = lab.connection(ca_file=other.ca_cert)
    with pytest.raises(sdk.Error, match=r"SSL|certificate"):
        con.test(raise_exception=True)
    con.close(logout=False)
    assert_clean(lab, before)


def test_api_needs_token(lab):
    context = ssl.create_default_context(cafile=lab.ca_file)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(lab.engine_url + "/disks", context=context)
    assert e.value.code == 401


def test_logout_revokes_token(lab):
    con = lab.connection()
    token = con.authenticate()
    assert system(con).get() is not None
    con.close()
    # Without credentials the SDK cannot replace the revoked token after the 401.
    stale = lab.connection(token=token, username=None, password=None)
    with pytest.raises(sdk.AuthError):
        system(stale).get()
    stale.close(logout=False)


def test_inventory(lab, con):
    dcs = system(con).data_centers_service().list(search="storage.name=nfs1", case_sensitive=True)
    assert [dc.name for dc in dcs] == ["Default"]
    assert system(con).data_centers_service().list(search="storage.name=nosuch") == []

    hosts = system(con).hosts_service().list()
    assert len(hosts) == 1
    host = hosts[0]
    assert host.status == types.HostStatus.UP
    assert host.address == lab.host_address
    found = (
        system(con)
        .hosts_service()
        .list(
            search=f"hw_id={host.hardware_information.uuid} and datacenter=Default and status=Up",
            case_sensitive=True,
        )
    )
    assert [h.id for h in found] == [host.id]
    assert system(con).hosts_service().list(search="hw_id=nosuch and status=Up") == []

    domains = {sd.name: sd for sd in system(con).storage_domains_service().list()}
    assert set(domains) == {"nfs1", "iscsi1", "scratch"}
    assert domains["nfs1"].storage.type == types.StorageType.NFS
    assert domains["scratch"].storage.type == types.StorageType.NFS
    assert domains["iscsi1"].storage.type == types.StorageType.ISCSI
    for sd in domains.values():
        assert sd.type == types.StorageDomainType.DATA
        assert sd.status == types.StorageDomainStatus.ACTIVE
        assert sd.available > 0
        assert sd.id == lab.storage_domains[sd.name]["id"]
    clusters = system(con).clusters_service().list()
    assert [c.name for c in clusters] == ["Default"]
    assert clusters[0].data_center.id == dcs[0].id


# Disks.


@pytest.mark.parametrize(
    "domain,fmt,sparse,backup",
    [
        ("nfs1", types.DiskFormat.COW, True, None),
        ("nfs1", types.DiskFormat.RAW, True, None),
        ("nfs1", types.DiskFormat.RAW, False, None),
        ("iscsi1", types.DiskFormat.COW, True, types.DiskBackup.INCREMENTAL),
        ("iscsi1", types.DiskFormat.COW, False, types.DiskBackup.INCREMENTAL),
        ("iscsi1", types.DiskFormat.RAW, False, None),
    ],
)
def test_disk_create(lab, con, domain, fmt, sparse, backup):
    disk = add_disk(con, domain, fmt=fmt, sparse=sparse, backup=backup, wait=False)
    # AddDisk answers at once with a locked disk; the volume comes later.
    assert disk.status == types.DiskStatus.LOCKED
    disk = wait_disk_status(con, disk.id, types.DiskStatus.OK)
    assert disk.format == fmt
    assert disk.sparse == sparse
    if domain == "iscsi1" and fmt == types.DiskFormat.RAW:
        # A raw volume on block storage spans its LV: whole 128 MiB extents.
        assert disk.provisioned_size == 128 * MiB
    else:
        assert disk.provisioned_size == IMAGE_SIZE
    assert disk.storage_domains[0].id == lab.storage_domains[domain]["id"]
    if fmt == types.DiskFormat.RAW and sparse:
        assert disk.actual_size == 0
    else:
        assert disk.actual_size > 0
    assert lab.hooks.states(disk.id) == ["locked", "ok"]
    volume = lab.hooks.volume(disk.id)
    assert volume["format"] == ("qcow2" if fmt == types.DiskFormat.COW else "raw")
    assert volume["domain"] == domain
    disk_service(con, disk.id).remove()
    assert not disk_exists(con, disk.id)


@pytest.mark.parametrize(
    "domain,fmt,sparse,backup,words",
    [
        ("iscsi1", types.DiskFormat.RAW, True, None, "RAW Sparse backup-None"),
        ("nfs1", types.DiskFormat.COW, False, None, "COW Preallocated backup-None"),
        ("iscsi1", types.DiskFormat.COW, False, None, "COW Preallocated backup-None"),
        ("nfs1", types.DiskFormat.RAW, True, types.DiskBackup.INCREMENTAL,
         "RAW Sparse backup-Incremental"),
    ],
)  # fmt: skip
def test_disk_invalid_configuration(lab, con, before, domain, fmt, sparse, backup, words):
    with pytest.raises(sdk.Error) as e:
        add_disk(con, domain, fmt=fmt, sparse=sparse, backup=backup)
    assert e.value.code == 409
    assert e.value.fault.reason == "Operation Failed"
    assert e.value.fault.detail == (
        f"[Cannot add Virtual Disk. Disk configuration ({words}) is incompatible with the "
        "storage domain type.]"
    )
    assert_clean(lab, before)


def test_disk_incomplete(lab, con, before):
    with pytest.raises(sdk.Error) as e:
        system(con).disks_service().add(
            types.Disk(name="x", storage_domains=[types.StorageDomain(name="nfs1")])
        )
    assert e.value.code == 400
    assert e.value.fault.reason == "Incomplete parameters"
    assert e.value.fault.detail == "Disk [provisionedSize, format] required for add"
    assert_clean(lab, before)


def test_disk_unknown_storage_domain(lab, con, before):
    with pytest.raises(sdk.NotFoundError) as e:
        add_disk(con, "nosuch")
    assert e.value.code == 404
    assert e.value.fault.detail == "Entity not found: nosuch"
    assert_clean(lab, before)


def test_disk_too_big_for_domain(lab, con, before):
    with pytest.raises(sdk.Error) as e:
        add_disk(con, "nfs1", size=1024**5, fmt=types.DiskFormat.RAW, sparse=False)
    assert e.value.code == 409
    assert e.value.fault.detail == (
        "[Cannot add Virtual Disk. Low disk space on Storage Domain nfs1.]"
    )
    assert_clean(lab, before)


def test_disk_missing(con):
    with pytest.raises(sdk.NotFoundError) as e:
        disk_service(con, str(uuid.uuid4())).get()
    # A bare 404, as the engine answers a GET of an unknown id.
    assert e.value.fault is None


def test_disk_duplicate_id(lab, con):
    disk = add_disk(con, "nfs1")
    before = lab.hooks.state()
    with pytest.raises(sdk.Error) as e:
        add_disk(con, "nfs1", id=disk.id)
    assert e.value.code == 409
    assert f"The selected disk ID: {disk.id} is already used" in e.value.fault.detail
    assert_clean(lab, before)
    disk_service(con, disk.id).remove()


def test_disk_search(con):
    name = f"search {uuid.uuid4().hex[:6]}"
    disk = add_disk(con, "iscsi1", name=name)
    other = add_disk(con, "nfs1")
    try:
        disks = system(con).disks_service()
        assert [d.id for d in disks.list(search=f'name="{name}"')] == [disk.id]
        assert [d.id for d in disks.list(search=f"id={disk.id}")] == [disk.id]
        found = disks.list(search="storage.name=iscsi1")
        assert disk.id in {d.id for d in found} and other.id not in {d.id for d in found}
        both = disks.list(search=f'name="{name}" and storage.name=nfs1')
        assert both == []
        prefix = name.split()[0].upper() + "*"
        assert disk.id in {d.id for d in disks.list(search=f"name={prefix}", case_sensitive=False)}
        assert disks.list(search=f"name={prefix}", case_sensitive=True) == []
        sd = (
            system(con).storage_domains_service().storage_domain_service(disk.storage_domains[0].id)
        )
        assert disk.id in {d.id for d in sd.disks_service().list()}
        with pytest.raises(sdk.Error) as e:
            disks.list(search="nosuchfield=1")
        assert e.value.code == 400
    finally:
        disk_service(con, disk.id).remove()
        disk_service(con, other.id).remove()


def test_disk_update_and_extend(lab, con):
    disk = add_disk(con, "nfs1", size=IMAGE_SIZE)
    service = disk_service(con, disk.id)
    try:
        updated = service.update(
            types.Disk(alias="renamed", description="new text", provisioned_size=2 * IMAGE_SIZE)
        )
        assert updated.alias == "renamed" and updated.name == "renamed"
        assert updated.description == "new text"
        disk = wait_disk_status(con, disk.id, types.DiskStatus.OK)
        assert disk.provisioned_size == 2 * IMAGE_SIZE
        assert lab.hooks.volume(disk.id)["capacity"] == 2 * IMAGE_SIZE
        assert lab.hooks.states(disk.id) == ["locked", "ok", "locked", "ok"]
        with pytest.raises(sdk.Error) as e:
            service.update(types.Disk(provisioned_size=IMAGE_SIZE))
        assert e.value.code == 400
        assert "New disk size must be larger" in e.value.fault.detail
    finally:
        service.remove()


def test_disk_remove_locked(lab, con):
    disk = add_disk(con, "nfs1")
    transfer = start_transfer(con, disk.id)
    with pytest.raises(sdk.Error) as e:
        disk_service(con, disk.id).remove()
    assert e.value.code == 409
    assert "Related operation is currently in progress" in e.value.fault.detail
    with pytest.raises(sdk.Error) as e:
        start_transfer(con, disk.id)
    assert e.value.code == 409
    assert "The following disks are locked" in e.value.fault.detail
    finalize(con, transfer)
    disk_service(con, disk.id).remove()
    with pytest.raises(sdk.NotFoundError):
        disk_service(con, disk.id).remove()


def test_disk_snapshots(lab, con, raw_image, tmp_path):
    disk = add_disk(con, "nfs1", fmt=types.DiskFormat.RAW)
    transfer = start_transfer(con, disk.id)
    client.upload(raw_image, transfer.transfer_url, lab.ca_file)
    finalize(con, transfer)
    snapshots = disk_service(con, disk.id).disk_snapshots_service()
    # Active layers are listed only on request.
    assert snapshots.list() == []
    active = snapshots.list(include_active=True)
    assert len(active) == 1
    snap = active[0]
    assert snap.id == disk_service(con, disk.id).get().image_id
    assert snap.disk.id == disk.id
    assert snapshots.snapshot_service(snap.id).get().id == snap.id
    # A download by disk snapshot reads the same volume.
    transfer = (
        system(con)
        .image_transfers_service()
        .add(
            types.ImageTransfer(
                snapshot=types.DiskSnapshot(id=snap.id),
                direction=DOWNLOAD,
                format=types.DiskFormat.RAW,
            )
        )
    )
    target = str(tmp_path / "snapshot.qcow2")
    client.download(transfer.transfer_url, target, lab.ca_file)
    finalize(con, transfer)
    subprocess.run(["qemu-img", "compare", raw_image, target], check=True)
    disk_service(con, disk.id).remove()


# Image transfers.


@pytest.mark.parametrize("domain", ["nfs1", "iscsi1"])
@pytest.mark.parametrize("disk_format", [types.DiskFormat.COW, types.DiskFormat.RAW])
def test_upload_download_nbd(lab, con, tmp_path, qcow2_image, domain, disk_format):
    sparse = not (domain == "iscsi1" and disk_format == types.DiskFormat.RAW)
    disk = add_disk(con, domain, fmt=disk_format, sparse=sparse, initial_size=IMAGE_SIZE * 2)
    transfer = start_transfer(con, disk.id, fmt=types.DiskFormat.RAW)
    assert transfer.transfer_url.startswith(f"https://{lab.host_address}:")
    assert transfer.proxy_url.startswith("https://localhost:")
    assert transfer.timeout_policy == types.ImageTransferTimeoutPolicy.LEGACY
    assert transfer.inactivity_timeout == 60
    host = con.follow_link(transfer.host)
    assert host.address == lab.host_address
    assert disk_service(con, disk.id).get().status == types.DiskStatus.LOCKED
    assert lab.hooks.state()["nbd_servers"] == [transfer.id]

    client.upload(qcow2_image, transfer.transfer_url, lab.ca_file, proxy_url=transfer.proxy_url)
    # The monitor copies the ticket's progress into the entity.
    wait_for(
        lambda: transfer_service(con, transfer.id).get().transferred > 0, 10, "transferred bytes"
    )
    done = finalize(con, transfer)
    assert done.transfer_url is None and done.proxy_url is None
    assert wait_disk_status(con, disk.id, types.DiskStatus.OK)
    assert lab.hooks.state()["nbd_servers"] == []
    compare_volume(lab, disk.id, qcow2_image)

    transfer = start_transfer(con, disk.id, direction=DOWNLOAD)
    target = str(tmp_path / "download.raw")
    client.download(transfer.transfer_url, target, lab.ca_file, fmt="raw")
    finalize(con, transfer)
    subprocess.run(["qemu-img", "compare", qcow2_image, target], check=True)
    disk_service(con, disk.id).remove()


@pytest.mark.parametrize("domain", ["nfs1", "iscsi1"])
def test_upload_qcow2_file_backend(lab, con, tmp_path, domain):
    # An old qcow2 (compat 0.10): the engine records it as qcow2_v2.
    qcow2_image = make_image(tmp_path / "old.qcow2", "qcow2", options=["compat=0.10"])
    disk = add_disk(con, domain, fmt=types.DiskFormat.COW, initial_size=IMAGE_SIZE * 2)
    assert disk_service(con, disk.id).get().qcow_version == types.QcowVersion.QCOW2_V3
    # No format: the file backend, the ticket gives the volume's bytes.
    transfer = start_transfer(con, disk.id, fmt=None)
    assert transfer.format == types.DiskFormat.COW
    assert lab.hooks.state()["nbd_servers"] == []
    with open(qcow2_image, "rb") as f:
        write_raw(lab, transfer, f.read())
    finalize(con, transfer)
    compare_volume(lab, disk.id, qcow2_image)
    assert disk_service(con, disk.id).get().qcow_version == types.QcowVersion.QCOW2_V2

    transfer = start_transfer(con, disk.id, direction=DOWNLOAD, fmt=None)
    with client.ImageioClient(transfer.transfer_url, lab.ca_file) as imageio:
        size = imageio.size()
        data = bytearray(size)
        imageio.read(0, memoryview(data))
    finalize(con, transfer)
    copy = tmp_path / "copy.qcow2"
    copy.write_bytes(bytes(data))
    subprocess.run(["qemu-img", "compare", qcow2_image, str(copy)], check=True)
    disk_service(con, disk.id).remove()


def test_finalize_corrupt_upload(lab, con, before):
    disk = add_disk(con, "nfs1", fmt=types.DiskFormat.COW)
    transfer = start_transfer(con, disk.id, fmt=types.DiskFormat.COW)
    # Guest data where the qcow2 header should be: verification must fail.
    write_raw(lab, transfer, b"\xab" * MiB)
    finalize(con, transfer, Phase.FINISHED_FAILURE)
    assert not disk_exists(con, disk.id)
    assert lab.hooks.states(disk.id) == ["locked", "ok", "locked", "illegal", "removed"]
    assert lab.hooks.states(transfer.id) == [
        "initializing",
        "transferring",
        "finalizing_success",
        "finalizing_failure",
        "finished_failure",
    ]
    assert_clean(lab, before)


@pytest.mark.parametrize("direction", [UPLOAD, DOWNLOAD])
def test_cancel(lab, con, raw_image, before, direction):
    disk = add_disk(con, "nfs1", fmt=types.DiskFormat.RAW)
    transfer = start_transfer(con, disk.id, direction=direction)
    if direction == UPLOAD:
        client.upload(raw_image, transfer.transfer_url, lab.ca_file)
    transfer_service(con, transfer.id).cancel()
    ended = wait_phase(con, transfer.id, Phase.FINISHED_FAILURE)
    assert ended.transfer_url is None
    assert lab.hooks.states(transfer.id)[-4:] == [
        "cancelled_user",
        "finalizing_cleanup",
        "finished_cleanup",
        "finished_failure",
    ]
    if direction == UPLOAD:
        # The upload owned the disk: the engine removes it.
        assert not disk_exists(con, disk.id)
        assert lab.hooks.states(disk.id)[-2:] == ["illegal", "removed"]
    else:
        assert wait_disk_status(con, disk.id, types.DiskStatus.OK)
        disk_service(con, disk.id).remove()
    assert_clean(lab, before)


def test_pause_resume(lab, con, raw_image):
    disk = add_disk(con, "nfs1", fmt=types.DiskFormat.RAW)
    transfer = start_transfer(con, disk.id)
    service = transfer_service(con, transfer.id)
    with pytest.raises(sdk.Error) as e:
        service.resume()
    assert e.value.code == 409
    assert e.value.fault.detail == ("[Cannot resume image transfer as it's not in a paused state.]")
    service.pause()
    assert service.get().phase == Phase.PAUSED_USER
    service.resume()
    wait_phase(con, transfer.id, Phase.TRANSFERRING)
    assert "resuming" in lab.hooks.states(transfer.id)
    client.upload(raw_image, transfer.transfer_url, lab.ca_file)
    finalize(con, transfer)
    compare_volume(lab, disk.id, raw_image)

    download = start_transfer(con, disk.id, direction=DOWNLOAD)
    with pytest.raises(sdk.Error) as e:
        transfer_service(con, download.id).pause()
    assert e.value.code == 400
    assert "Cannot pause image download" in e.value.fault.detail
    finalize(con, download)
    disk_service(con, disk.id).remove()


@pytest.mark.parametrize(
    "direction,policy,stopped,outcome",
    [
        (UPLOAD, "legacy", Phase.PAUSED_SYSTEM, None),
        (UPLOAD, "pause", Phase.PAUSED_SYSTEM, None),
        (UPLOAD, "cancel", Phase.CANCELLED_SYSTEM, "removed"),
        (DOWNLOAD, "legacy", Phase.CANCELLED_SYSTEM, "ok"),
        (DOWNLOAD, "pause", Phase.PAUSED_SYSTEM, None),
        (DOWNLOAD, "cancel", Phase.CANCELLED_SYSTEM, "ok"),
    ],
)
def test_inactivity_timeout(lab, con, before, direction, policy, stopped, outcome):
    disk = add_disk(con, "nfs1", fmt=types.DiskFormat.RAW)
    transfer = start_transfer(
        con,
        disk.id,
        direction=direction,
        inactivity_timeout=2,
        timeout_policy=types.ImageTransferTimeoutPolicy(policy),
    )
    assert transfer.inactivity_timeout == 2
    wait_for(lambda: stopped.value in lab.hooks.states(transfer.id), 20, f"transfer {stopped}")
    if outcome is None:
        # Paused: the disk stays locked until someone acts.
        assert transfer_service(con, transfer.id).get().phase == Phase.PAUSED_SYSTEM
        assert disk_service(con, disk.id).get().status == types.DiskStatus.LOCKED
        transfer_service(con, transfer.id).cancel()
        outcome = "removed" if direction == UPLOAD else "ok"
    wait_phase(con, transfer.id, Phase.FINISHED_FAILURE)
    if outcome == "removed":
        assert not disk_exists(con, disk.id)
    else:
        assert wait_disk_status(con, disk.id, types.DiskStatus.OK)
        disk_service(con, disk.id).remove()
    assert_clean(lab, before)


def test_upload_overflows_block_volume(lab, con, tmp_path, before):
    # 144 MiB of data for the 128 MiB LV that an initial size of 1 MiB gets.
    size = 160 * MiB
    source = make_image(tmp_path / "big.raw", "raw", size=size, writes=[(0, 144 * MiB, 0x5A)])
    disk = add_disk(
        con,
        "iscsi1",
        size=size,
        fmt=types.DiskFormat.COW,
        backup=types.DiskBackup.INCREMENTAL,
        initial_size=MiB,
    )
    lv_size = lab.hooks.volume(disk.id)["lv_size"]
    assert lv_size == 128 * MiB
    transfer = start_transfer(con, disk.id)
    # qemu-nbd fails the writes past the LV (ENOSPC): imageio answers 500, or
    # drops the connection while a big request is still being sent.
    with pytest.raises((imageio_http.Error, OSError)) as e:
        client.upload(source, transfer.transfer_url, lab.ca_file, disk_is_zero=True)
    if isinstance(e.value, imageio_http.Error):
        assert e.value.code == 500
    volume = lab.hooks.volume(disk.id)
    assert os.path.getsize(volume["path"]) == lv_size
    # What ovirt-img does on any upload error; the engine removes the disk.
    transfer_service(con, transfer.id).cancel()
    wait_phase(con, transfer.id, Phase.FINISHED_FAILURE)
    assert not disk_exists(con, disk.id)
    assert_clean(lab, before)


def test_upload_image_bigger_than_disk(lab, con, tmp_path, before):
    image = make_image(tmp_path / "big.raw", "raw", size=2 * IMAGE_SIZE,
                       writes=[(IMAGE_SIZE + MiB, MiB, 0x77)])  # fmt: skip
    disk = add_disk(con, "nfs1", fmt=types.DiskFormat.RAW, size=IMAGE_SIZE)
    transfer = start_transfer(con, disk.id)
    # The ticket covers the disk's size only: imageio answers 416, or drops
    # the connection while a big request is still being sent.
    with pytest.raises((imageio_http.Error, OSError)) as e:
        client.upload(image, transfer.transfer_url, lab.ca_file)
    if isinstance(e.value, imageio_http.Error):
        assert e.value.code == 416
    transfer_service(con, transfer.id).cancel()
    wait_phase(con, transfer.id, Phase.FINISHED_FAILURE)
    assert not disk_exists(con, disk.id)
    assert_clean(lab, before)


def test_transfer_validation(lab, con, before):
    transfers = system(con).image_transfers_service()
    with pytest.raises(sdk.Error) as e:
        transfers.add(types.ImageTransfer(disk=types.Disk(id=str(uuid.uuid4()))))
    assert e.value.code == 400
    assert "The specified disk does not exist" in e.value.fault.detail
    with pytest.raises(sdk.Error) as e:
        transfers.add(types.ImageTransfer(direction=DOWNLOAD))
    assert e.value.code == 400
    assert "Image was not specified for download" in e.value.fault.detail
    assert_clean(lab, before)


def test_legacy_image_transfer(lab, con, raw_image, tmp_path):
    # Clients of 4.1 name the disk as an image.
    disk = add_disk(con, "nfs1", fmt=types.DiskFormat.RAW)
    transfer = (
        system(con)
        .image_transfers_service()
        .add(types.ImageTransfer(image=types.Image(id=disk.id), format=types.DiskFormat.RAW))
    )
    assert transfer.direction == UPLOAD
    assert transfer.image.id == disk.id
    client.upload(raw_image, transfer.transfer_url, lab.ca_file)
    finalize(con, transfer)
    compare_volume(lab, disk.id, raw_image)
    disk_service(con, disk.id).remove()


def test_transfer_on_chosen_host(lab, con, raw_image):
    host = system(con).hosts_service().list()[0]
    disk = add_disk(con, "scratch", fmt=types.DiskFormat.RAW)
    transfer = start_transfer(con, disk.id, host=host)
    assert transfer.host.id == host.id
    client.upload(raw_image, transfer.proxy_url, lab.ca_file)
    finalize(con, transfer)
    # The entity stays readable after the end, without URLs.
    again = transfer_service(con, transfer.id).get()
    assert again.phase == Phase.FINISHED_SUCCESS
    assert again.image.id == disk.id
    assert transfer.id in {t.id for t in system(con).image_transfers_service().list()}
    compare_volume(lab, disk.id, raw_image)
    disk_service(con, disk.id).remove()


def test_imageio_restart_during_upload(lab, con, raw_image):
    disk = add_disk(con, "nfs1", fmt=types.DiskFormat.RAW)
    transfer = start_transfer(con, disk.id)
    with client.ImageioClient(transfer.transfer_url, lab.ca_file) as imageio:
        imageio.write(0, b"\x11" * MiB)
        imageio.flush()
    lab.hooks.imageio("restart")
    # The host daemon got its tickets back; a new connection goes on.
    client.upload(raw_image, transfer.transfer_url, lab.ca_file)
    finalize(con, transfer)
    compare_volume(lab, disk.id, raw_image)
    disk_service(con, disk.id).remove()


def test_slow_storage(lab, con, before):
    disk = add_disk(con, "nfs1", fmt=types.DiskFormat.RAW)
    lab.hooks.slow_storage(300)
    try:
        transfer = start_transfer(con, disk.id, direction=DOWNLOAD)
    finally:
        # NBD servers started from now on are fast again.
        lab.hooks.slow_storage(0)
    with client.ImageioClient(transfer.transfer_url, lab.ca_file) as imageio:
        buf = bytearray(65536)
        start = time.monotonic()
        imageio.read(0, memoryview(buf))
        assert time.monotonic() - start >= 0.3
    finalize(con, transfer)
    disk_service(con, disk.id).remove()
    assert_clean(lab, before)


# Jobs.


def test_jobs_by_correlation_id(lab, con):
    cid = f"test-{uuid.uuid4()}"
    disk = add_disk(con, "nfs1", wait=False, query={"correlation_id": cid})
    jobs_service = system(con).jobs_service()
    # The job exists as soon as the command answered.
    jobs = jobs_service.list(search=f"correlation_id={cid}")
    assert len(jobs) == 1
    assert jobs[0].description.startswith("Adding Disk ")
    assert jobs[0].status in (types.JobStatus.STARTED, types.JobStatus.FINISHED)
    wait_disk_status(con, disk.id, types.DiskStatus.OK)
    # As on oVirt, the job ends just after the command unlocked the disk.
    job_service = jobs_service.job_service(jobs[0].id)
    job = wait_for(
        lambda: (j := job_service.get()).status == types.JobStatus.FINISHED and j,
        10,
        "the job to finish",
    )
    assert job.end_time >= job.start_time
    assert jobs_service.list(search=f"correlation_id={uuid.uuid4()}") == []

    remove_cid = f"test-{uuid.uuid4()}"
    disk_service(con, disk.id).remove(query={"correlation_id": remove_cid})
    jobs = jobs_service.list(search=f"correlation_id={remove_cid}")
    assert [(j.description, j.status) for j in jobs] == [
        (f"Removing Disk {disk.name}", types.JobStatus.FINISHED)
    ]


# Test hooks.


def test_fault_injection(lab, con, before):
    lab.hooks.fail(
        "/ovirt-engine/api/disks", status=500, method="POST", detail="storage is on fire"
    )
    with pytest.raises(sdk.Error) as e:
        add_disk(con, "nfs1")
    assert e.value.code == 500
    assert e.value.fault.detail == "[storage is on fire]"
    assert_clean(lab, before)
    # An expired token: the SDK logs in again and replays the call.
    lab.hooks.fail("/ovirt-engine/api/disks*", status=401, method="GET")
    assert isinstance(system(con).disks_service().list(), list)
    assert lab.hooks.faults() == []
    # The answer lost after the call was carried out: the disk exists.
    lab.hooks.fail("/ovirt-engine/api/disks", status=502, method="POST", after=True)
    with pytest.raises(sdk.Error) as e:
        add_disk(con, "nfs1")
    assert e.value.code == 502
    (made,) = [d for d in lab.hooks.state()["disks"] if d["id"] not in {
        b["id"] for b in before["disks"]}]  # fmt: skip
    lab.hooks.settled()
    system(con).disks_service().disk_service(made["id"]).remove()
    with pytest.raises(Exception, match="use true with a status"):
        lab.hooks.fail("/ovirt-engine/api/disks", delay=1, after=True)


def test_stock_switch(lab):
    assert lab.hooks.stock() is False
    try:
        assert lab.hooks.stock(True) is True
        assert lab.hooks.stock() is True
    finally:
        lab.hooks.stock(False)


def test_http_details(lab, con):
    token = con.authenticate()
    context = ssl.create_default_context(cafile=lab.ca_file)

    def call(method, path, body=None):
        request = urllib.request.Request(
            lab.engine_url + path,
            method=method,
            data=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/xml"},
        )
        try:
            with urllib.request.urlopen(request, context=context) as reply:
                return reply.status, reply.headers.get("Content-Type"), reply.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type"), e.read()

    status, ctype, body = call("GET", "/nosuch")
    assert status == 404
    status, ctype, body = call("PUT", "/imagetransfers")
    assert status == 405
    disk = add_disk(con, "nfs1")
    status, ctype, body = call("DELETE", f"/disks/{disk.id}")
    # 200 with an <action>: the SDK refuses any other success status for DELETE.
    assert status == 200
    assert ctype.startswith("application/xml")
    assert b"<status>complete</status>" in body
    status, ctype, body = call("POST", "/disks", b"<disk><oops")
    assert status == 400
    assert b"<fault>" in body


# The lab's life cycle.


def lab_cli(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "lab", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def lab_files(directory):
    found = []
    for top, _dirs, names in os.walk(directory):
        found.extend(os.path.join(top, n) for n in names)
    return found


def test_cli_restart_keeps_disks(tmp_path, raw_image):
    directory = str(tmp_path / "lab")
    info = lab_cli("start", "--dir", directory, "--poll-interval", "0.5")
    assert info["username"] == "admin@internal"
    assert set(info["storage_domains"]) == {"nfs1", "iscsi1", "scratch"}
    assert lab_cli("status", "--dir", directory)["running"] is True
    lab = Lab(directory)
    hooks = lab_hooks(info)
    try:
        con = sdk.Connection(
            url=info["engine_url"],
            username=info["username"],
            password=info["password"],
            ca_file=info["ca_file"],
        )
        disk = add_disk(con, "iscsi1", initial_size=2 * IMAGE_SIZE)
        transfer = start_transfer(con, disk.id)
        client.upload(raw_image, transfer.transfer_url, info["ca_file"])
        finalize(con, transfer)
        checksum = hooks.checksum(disk.id)
        # An upload still open when the engine stops.
        pending = add_disk(con, "nfs1", fmt=types.DiskFormat.RAW)
        open_transfer = start_transfer(con, pending.id)
        con.close()
        pids = hooks.state()["processes"] + [info["pid"]]
    finally:
        assert lab_cli("stop", "--dir", directory)["stopped"] is True
    assert lab_cli("status", "--dir", directory) == {"dir": directory, "running": False}
    assert not [p for p in pids if alive(p)]

    info = lab.start()
    try:
        con = sdk.Connection(
            url=info["engine_url"],
            username=info["username"],
            password=info["password"],
            ca_file=info["ca_file"],
        )
        again = disk_service(con, disk.id).get()
        assert again.status == types.DiskStatus.OK
        assert lab_hooks(info).checksum(disk.id) == checksum == client.checksum(raw_image)
        # The host lost the ticket with the restart: the engine pauses the
        # upload, keeping the disk locked until the user cancels.
        wait_phase(con, open_transfer.id, Phase.PAUSED_SYSTEM)
        assert disk_service(con, pending.id).get().status == types.DiskStatus.LOCKED
        transfer_service(con, open_transfer.id).cancel()
        wait_phase(con, open_transfer.id, Phase.FINISHED_FAILURE)
        assert not disk_exists(con, pending.id)
        con.close()
    finally:
        lab.stop()


def test_start_stop_ten_times(tmp_path):
    directory = str(tmp_path / "lab")
    lab = Lab(directory)
    for _round in range(10):
        info = lab.start()
        pids = lab_hooks(info).state()["processes"] + [info["pid"]]
        assert len(pids) == 3  # the engine and two imageio daemons
        lab.stop()
        assert not [p for p in pids if alive(p)]
        sockets = [f for f in lab_files(directory) if f.endswith(".sock")]
        assert sockets == []
    assert lab.status()["running"] is False


def lab_hooks(info):
    return Hooks(info["hooks_url"], info["ca_file"])
