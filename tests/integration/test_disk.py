# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""thinair.ovirt.disk on the lab: ordinary and external disks, idempotence,
check mode, a stock engine that ignores external_disk, and bad input."""

from __future__ import annotations

import subprocess

import pytest

from tests.integration import errors
from tests.integration.transfers import auth_of

MiB = 1024**2


def disk_task(lab, **args):
    return {"thinair.ovirt.disk": dict(auth=auth_of(lab.info), **args)}


def lab_disks(lab, name):
    return [d for d in lab.hooks.state()["disks"] if d["alias"] == name]


def test_ordinary_disk(lab, ansible):
    present = disk_task(lab, name="disk-module", storage_domain="iscsi1", size="256MiB")
    absent = disk_task(lab, name="disk-module", state="absent")
    results = ansible.playbook([present, present, absent, absent])
    assert [r.get("changed") for r in results] == [True, False, True, False]
    assert not [r for r in results if r.get("failed")]
    disk = results[0]["disk"]
    assert disk["provisioned_size"] == 256 * MiB
    assert (disk["format"], disk["status"], disk["storage_domain"]) == ("cow", "ok", "iscsi1")
    assert results[0]["external"] is False
    assert results[1]["disk"]["id"] == disk["id"]
    assert lab_disks(lab, "disk-module") == []


def test_check_mode(lab, ansible):
    task = disk_task(lab, name="disk-check", storage_domain="nfs1", size="64MiB")
    results = ansible.playbook([task], check=True)
    assert results[0]["changed"] is True
    assert lab_disks(lab, "disk-check") == []


def test_external_disk(lab, ansible, export):
    image, url = export
    task = disk_task(
        lab, name="disk-external", storage_domain="scratch", size="64MiB", external_disk=url
    )
    results = ansible.playbook([task, task])
    assert [r.get("changed") for r in results] == [True, False]
    assert results[0]["external"] is True
    assert results[0]["disk"]["external_disk"] == url
    disk_id = results[0]["disk"]["id"]
    volume = lab.hooks.volume(disk_id)
    subprocess.run(["qemu-img", "compare", image, volume["qemu_json"]], check=True)
    ansible.playbook([disk_task(lab, name="disk-external", state="absent")])
    assert lab_disks(lab, "disk-external") == []


def test_stock_engine_ignores_external_disk(lab, ansible, export):
    url = export[1]
    lab.hooks.stock(True)
    try:
        task = disk_task(
            lab, name="disk-stock", storage_domain="scratch", size="64MiB", external_disk=url
        )
        results = ansible.playbook([task, disk_task(lab, name="disk-stock", state="absent")])
    finally:
        lab.hooks.stock(False)
    assert results[0]["changed"] is True
    assert results[0]["external"] is False
    assert results[0]["disk"]["external_disk"] is None
    assert lab_disks(lab, "disk-stock") == []


@pytest.mark.parametrize(
    "args, words",
    [
        ({"storage_domain": "nowhere", "size": "64MiB"}, "storage domain 'nowhere' not found"),
        ({"storage_domain": "nfs1", "size": "64 parsecs"}, errors.message("disk", "invalid size")),
        ({"size": "64MiB"}, "storage_domain is missing"),
        (
            {"storage_domain": "scratch", "size": "64MiB", "external_disk": "nbd:unix:/nowhere"},
            errors.message("disk", "unreadable external disk"),
        ),
        (
            {"storage_domain": "iscsi1", "size": "64MiB", "format": "raw"},
            "incompatible with the storage domain type",
        ),
    ],
)
def test_bad_input(lab, ansible, args, words):
    results = ansible.playbook([disk_task(lab, name="disk-bad", **args)])
    assert results[0]["failed"]
    assert words in results[0]["msg"]
    assert lab_disks(lab, "disk-bad") == []


def test_existing_disk_of_another_size_is_an_error(lab, ansible):
    first = disk_task(lab, name="disk-other", storage_domain="nfs1", size="64MiB")
    other = dict(
        disk_task(lab, name="disk-other", storage_domain="nfs1", size="128MiB"),
        ignore_errors=True,
    )
    results = ansible.playbook([first, other, disk_task(lab, name="disk-other", state="absent")])
    assert results[1]["failed"]
    assert "its size is 67108864, not 134217728" in results[1]["msg"]
    assert results[2]["changed"]
    assert lab_disks(lab, "disk-other") == []


def test_auth_from_the_environment_alone(lab, ansible):
    # No auth option at all, as AWX's oVirt credential runs modules.
    ansible.env.update(
        OVIRT_URL=lab.engine_url,
        OVIRT_USERNAME=lab.username,
        OVIRT_PASSWORD=lab.password,
        OVIRT_CAFILE=lab.ca_file,
    )
    task = {"thinair.ovirt.disk": {"name": "disk-env", "storage_domain": "nfs1", "size": "1MiB"}}
    absent = {"thinair.ovirt.disk": {"name": "disk-env", "state": "absent"}}
    results = ansible.playbook([task, absent])
    assert [r.get("changed") for r in results] == [True, True], results
    assert lab_disks(lab, "disk-env") == []


@pytest.mark.parametrize(
    "env, words",
    [
        ({}, errors.message("disk", "no engine URL anywhere")),
        ({"OVIRT_HOSTNAME": "engine.invalid"}, errors.message("disk", "no credentials anywhere")),
    ],
)
def test_no_engine_or_credentials_anywhere(ansible, env, words):
    for name in ("OVIRT_URL", "OVIRT_HOSTNAME", "OVIRT_USERNAME", "OVIRT_PASSWORD",
                 "OVIRT_TOKEN"):  # fmt: skip
        ansible.env.pop(name, None)
    ansible.env.update(env)
    results = ansible.playbook([{"thinair.ovirt.disk": {"name": "disk-env", "state": "absent"}}])
    assert results[0]["failed"]
    assert words in results[0]["msg"]
