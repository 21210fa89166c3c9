# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""thinair.ovirt.vm and thinair.ovirt.disk_move on the lab, with the lab's
guest: a VM booting from an uploaded disk with an external disk beside it,
started, moved live, stopped and removed; idempotence, check mode, cold moves
and bad input."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.integration.test_disk import disk_task, lab_disks
from tests.integration.transfers import auth_of
from tests.lab.test_vms import upload

MiB = 1024**2


def vm_task(lab, **args):
    return {"thinair.ovirt.vm": dict(auth=auth_of(lab.info), **args)}


def move_task(lab, **args):
    return {"thinair.ovirt.disk_move": dict(auth=auth_of(lab.info), **args)}


def lab_vms(lab, name):
    return [v for v in lab.hooks.state()["vms"] if v["name"] == name]


def test_vm_lifecycle_with_live_move(lab, ansible, con, export, guest_image, tmp_path):
    image, url = export
    boot = upload(lab, con, guest_image, lab.file_domain, "vm-module-boot")
    disks = [
        {"name": "vm-module-boot", "bootable": True},
        {"name": "vm-module-data", "interface": "virtio_scsi"},
    ]
    vm = {"name": "vm-module", "cluster": "Default", "memory": "256MiB", "cpus": 1,
          "disks": disks, "comment": "imported"}  # fmt: skip
    progress = str(tmp_path / "progress")
    results = ansible.playbook([
        disk_task(lab, name="vm-module-data", storage_domain="scratch", size="64MiB",
                  external_disk=url),
        vm_task(lab, **vm),
        vm_task(lab, **vm),
        vm_task(lab, **vm, state="running"),
        vm_task(lab, **vm, state="running"),
        vm_task(lab, **vm, state="running", wait_for_up=True),
        move_task(lab, name="vm-module-data", storage_domain="nfs1", progress_file=progress),
        move_task(lab, name="vm-module-data", storage_domain="nfs1"),
        vm_task(lab, name="vm-module", state="stopped", graceful=True),
    ])  # fmt: skip
    assert not [r for r in results if r.get("failed")], results
    assert [r["changed"] for r in results] == [True, True, False, True, False, False, True,
                                               False, True]  # fmt: skip
    created = results[1]["vm"]
    assert (created["status"], created["cluster"], created["memory"], created["cpus"],
            created["comment"]) == ("down", "Default", 256 * MiB, 1, "imported")  # fmt: skip
    assert [(d["name"], d["interface"], d["bootable"]) for d in created["disks"]] == [
        ("vm-module-boot", "virtio", True),
        ("vm-module-data", "virtio_scsi", False),
    ]
    assert results[3]["vm"]["status"] in ("powering_up", "up")
    assert results[5]["vm"]["status"] == "up"
    moved = results[6]
    assert (moved["disk"]["source"], moved["disk"]["storage_domain"]) == ("scratch", "nfs1")
    assert moved["job"]["status"] == "finished"
    assert moved["job"]["description"].startswith("Migrating Disk vm-module-data")
    assert results[7]["disk"]["storage_domain"] == "nfs1"
    assert results[8]["vm"]["status"] == "down"
    # The moved disk holds the exported image, and no longer reads the export.
    volume = lab.hooks.volume(moved["disk"]["id"])
    assert volume["domain"] == "nfs1"
    subprocess.run(["qemu-img", "compare", image, volume["qemu_json"]], check=True)
    assert not (tmp_path / "progress").exists()

    results = ansible.playbook([
        vm_task(lab, name="vm-module", state="absent"),
        vm_task(lab, name="vm-module", state="absent"),
    ])  # fmt: skip
    assert [r["changed"] for r in results] == [True, False]
    assert lab_vms(lab, "vm-module") == []
    assert lab_disks(lab, "vm-module-boot") == lab_disks(lab, "vm-module-data") == []
    assert lab.hooks.state()["vm_processes"] == []
    assert boot.id not in {d["id"] for d in lab.hooks.state()["disks"]}


def test_check_mode_changes_nothing(lab, ansible):
    results = ansible.playbook(
        [vm_task(lab, name="vm-check", cluster="Default", state="running")], check=True
    )
    assert results[0]["changed"] is True
    assert results[0]["vm"]["name"] == "vm-check"
    assert lab_vms(lab, "vm-check") == []


def test_cold_move_of_a_floating_disk(lab, ansible, export):
    image = export[0]
    create = disk_task(lab, name="cold-move", storage_domain="iscsi1", size="64MiB")
    results = ansible.playbook([create])
    disk_id = results[0]["disk"]["id"]
    subprocess.run(["qemu-img", "convert", "-n", "-O", lab.hooks.volume(disk_id)["format"],
                    image, lab.hooks.volume(disk_id)["path"]], check=True)  # fmt: skip
    results = ansible.playbook([
        move_task(lab, disk_id=disk_id, storage_domain="nfs1"),
        move_task(lab, disk_id=disk_id, storage_domain="nfs1"),
        disk_task(lab, name="cold-move", state="absent"),
    ])  # fmt: skip
    assert [r["changed"] for r in results] == [True, False, True]
    assert results[0]["job"]["description"].startswith("Moving Disk cold-move")
    assert results[0]["disk"]["storage_domain"] == "nfs1"


def test_move_whose_answer_is_lost(lab, ansible, export):
    """The engine starts the move but its answer is lost (a 502 from a proxy
    in front of it): the module finds the move's job and follows it rather
    than asking for a second move."""
    create = disk_task(lab, name="lost-answer", storage_domain="iscsi1", size="64MiB")
    disk_id = ansible.playbook([create])[0]["disk"]["id"]
    lab.hooks.fail("/ovirt-engine/api/disks/*/move", status=502, method="POST", after=True)
    move, remove = ansible.playbook([
        move_task(lab, disk_id=disk_id, storage_domain="nfs1"),
        disk_task(lab, name="lost-answer", state="absent"),
    ])  # fmt: skip
    assert move["changed"] and move["disk"]["storage_domain"] == "nfs1", move
    assert lab.hooks.faults() == []
    with open(os.path.join(lab.dir, "log", "engine.log")) as f:
        sent = [line for line in f if f"POST /ovirt-engine/api/disks/{disk_id}/move" in line]
    assert len(sent) == 1, sent
    assert remove["changed"]


@pytest.mark.parametrize(
    ("task", "words"),
    [
        ({"name": "vm-bad"}, "VM vm-bad does not exist and cluster is missing"),
        ({"name": "vm-bad", "cluster": "Default", "disks": [{"name": "no-such-disk"}]},
         "disk no-such-disk not found; create it first"),
        ({"name": "vm-bad", "cluster": "Default", "memory": "lots"}, "invalid size 'lots'"),
        ({"name": "vm-bad", "cluster": "no-such-cluster"},
         "cannot create VM vm-bad on cluster no-such-cluster: Entity not found"),
    ],
)  # fmt: skip
def test_vm_bad_input(lab, ansible, task, words):
    result = ansible.playbook([vm_task(lab, **task)])[0]
    assert result["failed"]
    assert words in result["msg"]
    assert lab_vms(lab, "vm-bad") == []


def test_move_bad_input(lab, ansible):
    results = ansible.playbook([
        dict(move_task(lab, name="no-such-disk", storage_domain="nfs1"), ignore_errors=True),
        disk_task(lab, name="move-bad", storage_domain="nfs1", size="1MiB"),
        dict(move_task(lab, name="move-bad", storage_domain="no-such-domain"), ignore_errors=True),
        disk_task(lab, name="move-bad", state="absent"),
    ])  # fmt: skip
    assert "disk no-such-disk not found" in results[0]["msg"]
    assert "storage domain 'no-such-domain' not found" in results[2]["msg"]
    assert not results[3].get("failed")
