# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""thinair.ovirt.disk_download run by ansible-playbook against the lab.

The disks are uploaded by the unmodified ovirt-img, so what is checked here
does not lean on disk_upload. Every download is compared with the source
image by qemu-img compare; every failure is checked to leave nothing behind:
no image transfer in a non-final phase, no locked disk, no qemu-nbd, no
temporary file beside dest, and dest as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.integration import errors
from tests.integration.transfers import (
    LabState,
    MiB,
    Modules,
    assert_cases_failed,
    assert_same,
    auth_of,
    failed,
    make_full_raw,
    make_raw,
    ok,
    read_progress,
    run_in_background,
    wait_for,
    with_changes,
)

OVIRT_IMG = os.path.join(os.path.dirname(sys.executable), "ovirt-img")


def ovirt_img_upload(lab, tmp_path, image, storage_domain, name):
    """Upload with ovirt-img; return the new disk's id."""
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))
    proc = subprocess.run(
        [
            OVIRT_IMG, "upload-disk",
            "--engine-url", lab.engine_base_url,
            "--username", lab.username,
            "--password-file", lab.password_file,
            "--cafile", lab.ca_file,
            "--storage-domain", storage_domain,
            "--name", name,
            "--output", "json",
            image,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with contextlib.closing(lab.connection()) as con:
        (disk,) = [
            d
            for d in con.system_service().disks_service().list(search=f"name={name}")
            if d.alias == name
        ]
    return disk.id


@pytest.fixture(scope="module", autouse=True)
def sources(lab, tmp_path_factory):
    """Two disks uploaded by ovirt-img from the same raw image: on file and
    block storage. Made before any test's lab_state, removed at the end of
    the module."""
    top = tmp_path_factory.mktemp("download-sources")
    raw = make_raw(top / "disk.raw")
    other = make_raw(top / "other.raw", seed=5)
    qcow2 = str(top / "disk.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow2], check=True)
    disks = {
        "nfs1": ovirt_img_upload(lab, top, qcow2, "nfs1", "dl-file"),
        "iscsi1": ovirt_img_upload(lab, top, qcow2, "iscsi1", "dl-block"),
    }
    yield {"raw": raw, "other": other, "disks": disks}
    lab.hooks.settled()
    with contextlib.closing(lab.connection()) as con:
        service = con.system_service().disks_service()
        for disk_id in disks.values():
            service.disk_service(disk_id).remove()


@pytest.fixture
def modules(ansible, lab, tmp_path):
    return Modules(ansible, auth_of(lab.info), tmp_path)


@pytest.fixture
def lab_state(lab, tmp_path):
    """As in test_disk_upload; the sources are made before it, so they are
    not counted as left behind."""
    lab.hooks.clear_faults()
    state = LabState(lab, tmp_path)
    yield state
    lab.hooks.clear_faults()
    lab.hooks.slow_storage(0)
    state.remove_new_disks()


@pytest.fixture
def downloads(tmp_path):
    """A directory for downloads, to tell what the module left in it."""
    path = tmp_path / "downloads"
    path.mkdir()
    return path


def image_info(path):
    return json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", path], capture_output=True, check=True
        ).stdout
    )


def checksum_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_download(modules, lab, lab_state, sources, downloads):
    file_disk, block_disk = sources["disks"]["nfs1"], sources["disks"]["iscsi1"]
    qcow2, raw, block = (str(downloads / n) for n in ("file.qcow2", "file.raw", "block.qcow2"))
    results = modules.run(
        modules.download(name="dl-file", dest=qcow2),
        modules.download(name="dl-file", dest=qcow2),
        modules.download(name="dl-file", dest=qcow2, force=True),
        modules.download(disk_id=file_disk, dest=raw, format="raw"),
        modules.download(disk_id=file_disk, dest=raw, format="raw"),
        modules.download(disk_id=block_disk, dest=block, max_workers=1),
    )
    first, again, forced, first_raw, again_raw, from_block = results
    size = os.path.getsize(sources["raw"])

    ok(first, True)
    assert (first["dest"], first["format"]) == (qcow2, "qcow2")
    assert first["disk"]["id"] == file_disk
    assert (first["disk"]["name"], first["disk"]["storage_domain"]) == ("dl-file", "nfs1")
    assert first["disk"]["status"] == "ok"
    transfer = first["transfer"]
    assert transfer["endpoint"] == "host"
    assert transfer["bytes"] == size
    assert transfer["data_bytes"] + transfer["zero_bytes"] == size
    # Zero extents of the disk are not read: the new image is zero already.
    assert transfer["data_bytes"] < size // 2
    ok(again, False)
    assert "transfer" not in again
    ok(forced, True)
    ok(first_raw, True)
    assert first_raw["format"] == "raw"
    ok(again_raw, False)
    ok(from_block, True)
    assert from_block["disk"]["storage_domain"] == "iscsi1"
    assert from_block["transfer"]["connections"] == 1

    assert image_info(qcow2)["format"] == "qcow2"
    assert image_info(raw)["format"] == "raw"
    for path in (qcow2, raw, block):
        assert_same(sources["raw"], path)
        assert os.stat(path).st_mode & 0o777 == 0o644
    # Sparse: only the data is allocated.
    assert os.stat(raw).st_blocks * 512 < size // 2
    assert sorted(os.listdir(downloads)) == ["block.qcow2", "file.qcow2", "file.raw"]
    lab_state.assert_nothing_left()


def test_check_mode(modules, lab, lab_state, sources, downloads):
    dest = downloads / "disk.qcow2"
    planned = modules.run_one(modules.download(name="dl-file", dest=str(dest)), check=True)
    ok(planned, True)
    assert "transfer" not in planned
    assert os.listdir(downloads) == []
    assert lab_state.new_transfers("download") == []

    # dest with other data: a download would change it, and does not.
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", sources["other"], dest], check=True)
    before = checksum_file(dest)
    would, made, same = modules.run(
        dict(modules.download(name="dl-file", dest=str(dest)), check_mode=True),
        modules.download(name="dl-file", dest=str(dest)),
        dict(modules.download(name="dl-file", dest=str(dest)), check_mode=True),
    )
    ok(would, True)
    assert "transfer" not in would
    ok(made, True)
    assert checksum_file(dest) != before
    ok(same, False)
    assert_same(sources["raw"], str(dest))
    assert os.listdir(downloads) == ["disk.qcow2"]
    lab_state.assert_nothing_left()


def test_verify_and_snapshot(modules, lab, lab_state, sources, downloads):
    disk_id = sources["disks"]["iscsi1"]
    with contextlib.closing(lab.connection()) as con:
        snapshots = (
            con.system_service()
            .disks_service()
            .disk_service(disk_id)
            .disk_snapshots_service()
            .list(include_active=True)
        )
    assert snapshots
    verified, snapshot = modules.run(
        modules.download(disk_id=disk_id, dest=str(downloads / "v.raw"), format="raw", verify=True),
        modules.download(
            disk_id=disk_id, snapshot_id=snapshots[-1].id, dest=str(downloads / "s.qcow2")
        ),
    )
    ok(verified, True)
    ok(snapshot, True)
    assert_same(sources["raw"], str(downloads / "v.raw"))
    assert_same(sources["raw"], str(downloads / "s.qcow2"))
    lab_state.assert_nothing_left()


# Faults.


@pytest.fixture
def busy_disk(lab, tmp_path, lab_state):
    """A disk with 48 MiB of data: downloaded in small requests from slow
    storage, it takes seconds."""
    image = make_full_raw(tmp_path / "busy.raw", 64 * MiB, 48 * MiB)
    disk_id = ovirt_img_upload(lab, tmp_path, image, "nfs1", "busy")
    lab.hooks.slow_storage(20)
    return {"image": image, "id": disk_id}


def start_slow_download(modules, disk_id, dest, progress, **args):
    join = run_in_background(
        modules,
        modules.download(
            disk_id=disk_id, dest=str(dest), buffer_size=65536, progress_file=str(progress),
            **args,
        ),
    )  # fmt: skip
    wait_for(
        lambda: (read_progress(progress) or {}).get("phase") == "downloading",
        what="the download to start",
    )
    time.sleep(0.3)
    return join


def test_imageio_restart_mid_download(modules, lab, lab_state, busy_disk, downloads, tmp_path):
    """The host's imageio daemon restarts while data moves. The reads cut off
    are sent again until it is back, and the download completes."""
    dest = downloads / "busy.qcow2"
    progress = tmp_path / "progress.json"
    join = start_slow_download(modules, busy_disk["id"], dest, progress)
    lab.hooks.imageio("restart")
    (result,) = join()
    ok(result, True)
    assert result["transfer"]["retries"]
    lab.hooks.slow_storage(0)
    assert_same(busy_disk["image"], dest)
    assert os.listdir(downloads) == ["busy.qcow2"]
    lab_state.assert_nothing_left(disks={busy_disk["id"]}, imageio_restarted=True)


def test_imageio_gone_longer_than_retry_timeout(
    modules, lab, lab_state, busy_disk, downloads, tmp_path
):
    """The daemon stays away longer than retry_timeout: the download fails,
    saying how long it tried; the transfer is finalized once the host can end
    it, dest keeps its old data and no partial file is left."""
    dest = downloads / "busy.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", dest, "1M"], check=True)
    before = checksum_file(dest)
    progress = tmp_path / "progress.json"
    join = start_slow_download(modules, busy_disk["id"], dest, progress, retry_timeout=2)
    lab.hooks.imageio("stop")
    try:
        time.sleep(4)
    finally:
        # Back for the undo: the host ends the transfer.
        lab.hooks.imageio("start")
    (result,) = join()
    failed(result, "GET https://")
    assert (
        errors.message("disk_download", "imageio gone longer than retry_timeout") in result["msg"]
    )
    assert re.search(r"\(sent \d+ times in 2\.\d s\)", result["msg"]), result["msg"]
    assert checksum_file(dest) == before
    assert os.listdir(downloads) == ["busy.qcow2"]
    assert not progress.exists()
    lab_state.assert_nothing_left(disks={busy_disk["id"]}, imageio_restarted=True)
    with contextlib.closing(lab.connection()) as con:
        disk = con.system_service().disks_service().disk_service(busy_disk["id"]).get()
    assert disk.status.value == "ok"


def test_engine_unavailable_while_polling(modules, lab, lab_state, sources, downloads):
    lab.hooks.fail("/ovirt-engine/api/imagetransfers/*", status=503, method="GET", count=3)
    dest = str(downloads / "polled.qcow2")
    ok(modules.run_one(modules.download(name="dl-block", dest=dest)), True)
    assert lab.hooks.faults() == []
    assert_same(sources["raw"], dest)
    lab_state.assert_nothing_left()


# Bad input: a clear message, and nothing left behind.

# The changes to a good download that make each case of errors.ERRORS.
BAD_DOWNLOADS = {
    "unknown disk": {"name": "no-such-disk"},
    "destination in a missing directory": {"dest": "DOWNLOADS/missing/disk.qcow2"},
    "destination is a directory": {"dest": "DOWNLOADS"},
    "no disk given": {"name": None},
}


def test_bad_download(modules, lab, lab_state, downloads):
    def fill(value):
        if not isinstance(value, str):
            return value
        return value.replace("DOWNLOADS", str(downloads))

    tasks = []
    cases = {}
    good = {"name": "dl-file", "dest": str(downloads / "disk.qcow2")}
    for case, changes in BAD_DOWNLOADS.items():
        args = with_changes(good, changes, fill, modules.auth)
        tasks += [dict(modules.download(**args), check_mode=True), modules.download(**args)]
        cases[case] = (changes, errors.message("disk_download", case))
    results = modules.run(*tasks)
    assert_cases_failed(cases, results, fill)
    assert os.listdir(downloads) == []
    lab_state.assert_nothing_left()


def test_full_file_system(modules, lab, lab_state, sources, downloads):
    """The destination's file system fills up: the download fails, its
    transfer is finalized and its partial file removed; the disk is as it was."""
    full = downloads / "full"
    full.mkdir()
    # 1 MiB of room for a disk holding 1.6 MiB of data.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    try:
        result = modules.run_one(
            modules.download(name="dl-file", dest=str(full / "disk.qcow2"), format="raw")
        )
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)
    message = errors.message("disk_download", "full file system")
    # Whichever worker finds the file system full first names its offset.
    pattern = re.escape(message.replace("DOWNLOADS", str(downloads))).replace("OFFSET", r"\d+")
    assert result.get("failed") and re.search(pattern, result["msg"]), result
    lab_state.assert_nothing_left()
