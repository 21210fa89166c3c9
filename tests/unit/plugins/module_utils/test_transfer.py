# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Uploads and downloads as the modules run them (_transfer), against the
lab: the plan, the disk made, the copy, the checksum comparison of a second
run, check mode, and what a failure leaves (nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from ansible_collections.thinair.ovirt.plugins.module_utils import _engine, _progress, _transfer

pytestmark = pytest.mark.usefixtures("before")

MiB = 1024**2


@pytest.fixture
def engine(lab):
    engine = _engine.Engine(lab.auth(), timeout=120, poll_interval=0.2)
    yield engine
    engine.close()


@pytest.fixture
def image(tmp_path):
    """A 64 MiB qcow2 image with data at its start, middle and end."""
    path = str(tmp_path / "image.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(64 * MiB)], check=True)
    writes = []
    for offset, pattern in ((0, 0x11), (30 * MiB, 0x22), (63 * MiB, 0x33)):
        writes += ["-c", f"write -P {pattern:#x} {offset} 1M"]
    subprocess.run(["qemu-io", "-f", "qcow2", *writes, path], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return path


def options_of(lab, **values):
    options = {
        "ca_file": lab.ca_file,
        "insecure": False,
        "verify": True,
        "timeout": 120,
        "retry_timeout": 10,
    }
    options.update(values)
    return options


def new_disks(lab, before):
    known = {d["id"] for d in before["disks"]}
    return [d for d in lab.hooks.state()["disks"] if d["id"] not in known]


def test_upload_then_download(lab, engine, image, tmp_path, before):
    name = f"transfer-test-{uuid.uuid4().hex[:8]}"
    progress_file = str(tmp_path / "progress.json")
    progress = _progress.Progress(progress_file, interval=0)
    result = _transfer.upload(
        engine, options_of(lab, image=image, name=name, storage_domain="nfs1"), progress
    )
    assert result["changed"]
    assert result["plan"]["format"] == "cow" and result["plan"]["sparse"]
    disk = result["disk"]
    assert (disk["name"], disk["status"], disk["storage_domain"]) == (name, "ok", "nfs1")
    assert (result["transfer"]["bytes"], result["transfer"]["data_bytes"]) == (64 * MiB, 3 * MiB)
    with open(progress_file) as f:
        assert json.load(f)["phase"] == "done"

    # The same image again: the checksums match, nothing is sent.
    again = _transfer.upload(
        engine, options_of(lab, image=image, name=name), _progress.Progress()
    )  # fmt: skip
    assert not again["changed"] and "transfer" not in again

    dest = str(tmp_path / "downloaded.raw")
    result = _transfer.download(
        engine, options_of(lab, disk_id=disk["id"], dest=dest, format="raw"), _progress.Progress()
    )
    assert result["changed"] and result["format"] == "raw"
    subprocess.run(["qemu-img", "compare", "-q", image, dest], check=True)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".part")] == []
    engine.remove_disk(disk["id"])
    assert new_disks(lab, before) == []


def test_check_mode_plans_and_makes_nothing(lab, engine, image, before):
    options = options_of(lab, image=image, name="planned-only", storage_domain="iscsi1")
    result = _transfer.upload(engine, options, _progress.Progress(), check_mode=True)
    assert result["changed"]
    plan = result["plan"]
    assert (plan["name"], plan["storage_domain"]) == ("planned-only", "iscsi1")
    assert plan["format"] == "cow"
    # On block storage a qcow2 volume is allocated up front, as qemu-img measure says.
    assert plan["initial_size"] > 3 * MiB
    assert new_disks(lab, before) == []
    assert lab.hooks.state()["open_transfers"] == []


def test_transfer_refused_removes_the_new_disk(lab, engine, image, before):
    lab.hooks.fail("/ovirt-engine/api/imagetransfers", 400, method="POST", detail="no host")
    options = options_of(lab, image=image, name="refused", storage_domain="nfs1")
    with pytest.raises(_engine.EngineError, match="no host"):
        _transfer.upload(engine, options, _progress.Progress())
    assert new_disks(lab, before) == []
    assert lab.hooks.state()["open_transfers"] == []


def test_image_larger_than_the_disk(lab, engine, image, tmp_path, before):
    spec = {
        "format": "raw",
        "sparse": True,
        "provisioned_size": 32 * MiB,
        "backup": "none",
        "content_type": "data",
    }
    disk = engine.create_disk(spec, "nfs1", f"small-{uuid.uuid4().hex[:8]}")
    try:
        options = options_of(lab, image=image, disk_id=disk.id, force=True)
        with pytest.raises(_transfer.TransferError, match="holds only 33554432 bytes"):
            _transfer.upload(engine, options, _progress.Progress())
        assert lab.hooks.state()["open_transfers"] == []
        assert str(engine.get_disk(disk.id).status) == "ok"
    finally:
        engine.remove_disk(disk.id)
    assert new_disks(lab, before) == []


def test_download_of_a_missing_disk(lab, engine, tmp_path):
    dest = str(tmp_path / "never.raw")
    options = options_of(lab, name="no-such-disk", dest=dest)
    with pytest.raises(_transfer.TransferError, match="disk no-such-disk not found"):
        _transfer.download(engine, options, _progress.Progress())
    assert os.listdir(tmp_path) == []
