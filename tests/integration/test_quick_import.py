# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""import_vm.yml and rollback_vm.yml on the lab, with the lab's guest: a
2-disk VM runs from its exports, its disks move live to their domain while
the guest writes, a rerun changes nothing, a preview rolls back to nothing,
a stock engine gets copies, and failures before the VM runs leave nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from ovirtsdk4 import types

from tests.helpers import qemu_io, wait_for
from tests.integration.conftest import BIN, ROOT
from tests.integration.transfers import auth_of
from tests.lab.test_vms import sequence, wait_vm

MiB = 1024**2
VM = "qi-vm"
PORT = 10909

pytestmark = pytest.mark.usefixtures("before")


def playbook(name):
    with open(os.path.join(ROOT, "playbooks", name)) as f:
        return f.read()


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def sources(tmp_path, guest_image):
    """A 2-disk VM on the "external system": the guest's boot disk and a
    data disk with a pattern; their checksums, to prove them untouched."""
    boot = str(tmp_path / "boot.raw")
    shutil.copyfile(guest_image, boot)
    data = str(tmp_path / "data.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", data, str(64 * MiB)], check=True)
    qemu_io(data, "qcow2", "write -P 0x5e 0 8M", "write -P 0x6f 40M 4M")
    before = {path: digest(path) for path in (boot, data)}
    yield boot, data
    assert {path: digest(path) for path in (boot, data)} == before
    left = exports_of(tmp_path)
    subprocess.run(["pkill", "-f", f"qemu-nbd.*{tmp_path}"], check=False)
    assert left == []


def exports_of(directory):
    out = subprocess.run(["pgrep", "-af", f"qemu-nbd.*{directory}"], capture_output=True,
                         text=True, check=False).stdout  # fmt: skip
    return out.splitlines()


def import_vars(lab, boot, data, **extra):
    return dict(
        {
            "quick_import_auth": auth_of(lab.info),
            "quick_import_temporary_storage_domain": lab.scratch_domain,
            "quick_import_storage_domain": lab.file_domain,
            "quick_import_export_port": PORT,
            "quick_import_vms": [
                {
                    "name": VM,
                    "cluster": "Default",
                    "memory": "256MiB",
                    "cpus": 1,
                    "disks": [
                        {"image": boot, "bootable": True},
                        {"image": data, "interface": "virtio_scsi"},
                    ],
                }
            ],
        },
        **extra,
    )


def rollback_vars(lab, **extra):
    return dict({"rollback_import_auth": auth_of(lab.info), "rollback_import_vm_name": VM}, **extra)


def run(ansible, name, extra_vars):
    """Run one of the collection's playbooks; its task results."""
    return ansible.run(playbook(name), extra_vars=extra_vars)


def failures(results):
    return [r for r in results if r.get("failed") and not r.get("ignored")]


def vm_state(lab):
    found = [v for v in lab.hooks.state()["vms"] if v["name"] == VM]
    return found[0] if found else None


def vm_disks(lab):
    return sorted((d for d in lab.hooks.state()["disks"] if d["alias"].startswith(f"{VM}-disk")),
                  key=lambda d: d["alias"])  # fmt: skip


def assert_nothing_left(lab, tmp_path):
    assert vm_state(lab) is None
    assert vm_disks(lab) == []
    assert exports_of(tmp_path) == []
    assert lab.hooks.state()["vm_processes"] == []


def test_import_preview_then_keep(lab, ansible, con, sources, tmp_path):
    boot, data = sources
    # A preview: the VM runs from the exports, nothing moves.
    start = time.monotonic()
    results = run(ansible, "import_vm.yml", import_vars(lab, boot, data, quick_import_keep=False))
    assert failures(results) == []
    vm = vm_state(lab)
    assert vm["status"] in ("powering_up", "up"), vm
    assert time.monotonic() - start < 60
    disks = vm_disks(lab)
    assert [d["alias"] for d in disks] == [f"{VM}-disk1", f"{VM}-disk2"]
    assert {lab.hooks.volume(d["id"])["domain"] for d in disks} == {lab.scratch_domain}
    assert len(exports_of(tmp_path)) == 2
    boot_id, data_id = disks[0]["id"], disks[1]["id"]
    temporary = [lab.hooks.volume(d["id"])["path"] for d in disks]

    # The guest writes before, during and after the moves a second run makes.
    wait_vm(con, vm["id"], types.VmStatus.UP, timeout=60)
    expected = str(tmp_path / "expected.qcow2")
    shutil.copyfile(data, expected)
    writes = [(16 * MiB, 0x11)]
    lab.hooks.guest_write(vm["id"], data_id, 16 * MiB, 65536, 0x11)
    done = threading.Event()

    def write_while_moving():
        offset = 20 * MiB
        while not done.is_set() and offset < 30 * MiB:
            lab.hooks.guest_write(vm["id"], data_id, offset, 65536, 0x22)
            writes.append((offset, 0x22))
            offset += MiB
            time.sleep(0.2)

    # Each move lasts a few seconds more, while its mirror runs: time for
    # guest writes and progress lines.
    lab.hooks.fail("/copy", method="MOVE", delay=4, count=2)
    writer = threading.Thread(target=write_while_moving)
    writer.start()
    try:
        results = run(ansible, "import_vm.yml",
                      import_vars(lab, boot, data, quick_import_progress_interval=1))  # fmt: skip
    finally:
        done.set()
        writer.join()
    assert failures(results) == []
    assert len(writes) > 2
    (follow,) = [
        r for r in results if r["task"].endswith("Follow the moves until every one has ended")
    ]
    lines = [item["_ansible_item_label"] for item in follow["results"]]
    assert lines[-1] == "every move has ended"
    assert len(lines) >= 2
    assert all(line.startswith(f"{VM}/{VM}-disk") and f": moving to {lab.file_domain}" in line
               for line in lines[:-1])  # fmt: skip
    (shown,) = [r for r in results if r["task"].endswith("Show what each move did")]
    assert f"{VM}/{VM}-disk1: moved from {lab.scratch_domain} in " in shown["msg"][0]
    lab.hooks.guest_write(vm["id"], data_id, 32 * MiB, 65536, 0x33)
    writes.append((32 * MiB, 0x33))
    assert {lab.hooks.volume(d)["domain"] for d in (boot_id, data_id)} == {lab.file_domain}
    assert [path for path in temporary if os.path.exists(path)] == []
    assert exports_of(tmp_path) == []
    assert vm_state(lab)["status"] == "up"

    # Run again: nothing changes.
    results = run(ansible, "import_vm.yml", import_vars(lab, boot, data))
    assert failures(results) == []
    assert [r["task"] for r in results if r.get("changed")] == []

    # The guest shuts down cleanly; its disks hold every write.
    vms = con.system_service().vms_service()
    vms.vm_service(vm["id"]).shutdown()
    wait_vm(con, vm["id"], types.VmStatus.DOWN, timeout=60)
    for offset, pattern in writes:
        qemu_io(expected, "qcow2", f"write -P {pattern:#x} {offset} 64k")
    subprocess.run(["qemu-img", "compare", expected, lab.hooks.volume(data_id)["qemu_json"]],
                   check=True)  # fmt: skip
    numbers = sequence(lab, boot_id)
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) > 10

    # A complete import is rolled back only when forced.
    results = run(ansible, "rollback_vm.yml", rollback_vars(lab))
    assert "rollback_import_force" in failures(results)[0]["msg"]
    assert vm_state(lab) is not None
    results = run(ansible, "rollback_vm.yml", rollback_vars(lab, rollback_import_force=True))
    assert failures(results) == []
    assert_nothing_left(lab, tmp_path)


def test_rollback_after_preview(lab, ansible, sources, tmp_path):
    boot, data = sources
    results = run(ansible, "import_vm.yml", import_vars(lab, boot, data, quick_import_keep=False))
    assert failures(results) == []
    assert vm_state(lab)["status"] in ("powering_up", "up")
    results = run(ansible, "rollback_vm.yml", rollback_vars(lab))
    assert failures(results) == []
    assert_nothing_left(lab, tmp_path)
    # Again: nothing to do.
    results = run(ansible, "rollback_vm.yml", rollback_vars(lab))
    assert failures(results) == []
    assert not [r for r in results if r.get("changed")]


def test_rollback_leaves_other_vms_alone(lab, ansible, con):
    vm = con.system_service().vms_service().add(
        types.Vm(name=VM, cluster=types.Cluster(name="Default"),
                 template=types.Template(name="Blank"))
    )  # fmt: skip
    try:
        results = run(ansible, "rollback_vm.yml", rollback_vars(lab))
        assert failures(results) == []
        assert vm_state(lab)["id"] == vm.id
    finally:
        con.system_service().vms_service().vm_service(vm.id).remove()


def test_stock_engine_gets_copies(lab, ansible, sources, tmp_path):
    boot, data = sources
    lab.hooks.stock(True)
    try:
        results = run(ansible, "import_vm.yml", import_vars(lab, boot, data))
    finally:
        lab.hooks.stock(False)
    assert failures(results) == []
    (shown,) = [r for r in results if r["task"].endswith("Show how each VM was imported")]
    assert "copy import (the engine ignored external_disk" in shown["results"][0]["msg"]
    disks = vm_disks(lab)
    assert {lab.hooks.volume(d["id"])["domain"] for d in disks} == {lab.file_domain}
    assert exports_of(tmp_path) == []
    results = run(ansible, "rollback_vm.yml", rollback_vars(lab, rollback_import_force=True))
    assert failures(results) == []
    assert_nothing_left(lab, tmp_path)


@pytest.mark.parametrize(
    ("path", "method"),
    [("/ovirt-engine/api/vms", "POST"), ("/ovirt-engine/api/vms/*/start", "POST")],
)
def test_failure_before_the_vm_runs_leaves_nothing(lab, ansible, sources, tmp_path, path, method):
    boot, data = sources
    lab.hooks.fail(path, 500, method=method, detail="engine trouble")
    results = run(ansible, "import_vm.yml", import_vars(lab, boot, data))
    assert "The import failed and was undone" in failures(results)[-1]["msg"]
    assert "engine trouble" in failures(results)[-1]["msg"]
    assert_nothing_left(lab, tmp_path)
    # Run again, it imports.
    results = run(ansible, "import_vm.yml", import_vars(lab, boot, data))
    assert failures(results) == []
    assert vm_state(lab)["status"] == "up"
    results = run(ansible, "rollback_vm.yml", rollback_vars(lab, rollback_import_force=True))
    assert failures(results) == []
    assert_nothing_left(lab, tmp_path)


def test_vms_are_imported_side_by_side(lab, ansible, sources, tmp_path):
    # Each VM on a host of its own: one whose image is missing is undone,
    # the other is imported with exports of its own.
    boot, data = sources
    other = f"{VM}-b"
    extra = import_vars(lab, boot, data, quick_import_keep=False)
    extra["quick_import_vms"].append(
        dict(extra["quick_import_vms"][0], name=other,
             disks=[{"image": boot}, {"image": str(tmp_path / "missing.qcow2")}])
    )  # fmt: skip
    results = run(ansible, "import_vm.yml", extra)
    failed = failures(results)
    assert {r["host"] for r in failed} == {f"quick_import_{other}"}
    assert "The import failed and was undone" in failed[-1]["msg"]
    assert vm_state(lab)["status"] in ("powering_up", "up")
    assert [v for v in lab.hooks.state()["vms"] if v["name"] == other] == []
    assert [d for d in lab.hooks.state()["disks"] if d["alias"].startswith(other)] == []
    ports = sorted(line.split("--port=")[1].split()[0] for line in exports_of(tmp_path))
    assert ports == [str(PORT), str(PORT + 1)]
    results = run(ansible, "rollback_vm.yml", rollback_vars(lab, rollback_import_force=True))
    assert failures(results) == []
    assert_nothing_left(lab, tmp_path)


def test_as_awx_runs_them(lab, sources, tmp_path, monkeypatch):
    """Both playbooks as AWX job templates run them: through ansible-runner,
    the credentials in OVIRT_* environment variables, the rest in extra vars;
    the moves' progress lines are events of the job."""
    import ansible_runner

    boot, data = sources
    monkeypatch.setenv("PATH", BIN + os.pathsep + os.environ["PATH"])
    env = {
        "OVIRT_URL": lab.engine_url,
        "OVIRT_USERNAME": lab.username,
        "OVIRT_PASSWORD": lab.password,
        "OVIRT_CAFILE": lab.ca_file,
        "ANSIBLE_COLLECTIONS_PATH": os.path.join(ROOT, ".collections"),
    }
    inventory = f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}"
    extra = import_vars(lab, boot, data, quick_import_progress_interval=1)
    del extra["quick_import_auth"]
    lab.hooks.fail("/copy", method="MOVE", delay=3, count=2)

    def job(name, extravars):
        private = tmp_path / name
        private.mkdir()
        runner = ansible_runner.run(
            private_data_dir=str(private),
            playbook=os.path.join(ROOT, "playbooks", name),
            inventory=inventory,
            extravars=extravars,
            envvars=env,
            quiet=True,
        )
        assert runner.status == "successful", runner.stdout.read()[-3000:]
        assert lab.password not in runner.stdout.read()
        return list(runner.events)

    events = job("import_vm.yml", extra)
    lines = [
        e["event_data"]["res"]["_ansible_item_label"]
        for e in events
        if e["event"] == "runner_item_on_ok"
        and e["event_data"]["task"] == "Follow the moves until every one has ended"
    ]
    assert lines[-1] == "every move has ended"
    assert any(f": moving to {lab.file_domain}" in line for line in lines)
    assert vm_state(lab)["status"] == "up"

    job("rollback_vm.yml", {"rollback_import_vm_name": VM, "rollback_import_force": True})
    assert_nothing_left(lab, tmp_path)


def preview_up(lab, ansible, con, boot, data):
    """A preview import, its VM up; the VM and the data disk's id."""
    results = run(ansible, "import_vm.yml", import_vars(lab, boot, data, quick_import_keep=False))
    assert failures(results) == []
    vm = vm_state(lab)
    wait_vm(con, vm["id"], types.VmStatus.UP, timeout=60)
    return vm, vm_disks(lab)[1]["id"]


def finish_and_check(lab, ansible, con, data, vm, data_id, writes, tmp_path):
    """Run the import again; then every disk is moved, the exports stopped,
    and the data disk holds the source plus every guest write."""
    results = run(ansible, "import_vm.yml", import_vars(lab, boot_of(tmp_path), data))
    assert failures(results) == []
    assert {lab.hooks.volume(d["id"])["domain"] for d in vm_disks(lab)} == {lab.file_domain}
    assert exports_of(tmp_path) == []
    assert vm_state(lab)["status"] == "up"
    lab.hooks.guest_write(vm["id"], data_id, 48 * MiB, 65536, 0x44)
    writes.append((48 * MiB, 0x44))
    expected = str(tmp_path / "expected.qcow2")
    shutil.copyfile(data, expected)
    for offset, pattern in writes:
        qemu_io(expected, "qcow2", f"write -P {pattern:#x} {offset} 64k")
    service = con.system_service().vms_service().vm_service(vm["id"])
    service.stop()
    subprocess.run(["qemu-img", "compare", expected, lab.hooks.volume(data_id)["qemu_json"]],
                   check=True)  # fmt: skip
    results = run(ansible, "rollback_vm.yml", rollback_vars(lab, rollback_import_force=True))
    assert failures(results) == []


def boot_of(tmp_path):
    return str(tmp_path / "boot.raw")


def test_failed_moves_leave_the_vm_running(lab, ansible, con, sources, tmp_path):
    boot, data = sources
    vm, data_id = preview_up(lab, ansible, con, boot, data)
    lab.hooks.guest_write(vm["id"], data_id, 16 * MiB, 65536, 0x11)
    writes = [(16 * MiB, 0x11)]
    lab.hooks.fail("/copy", method="MOVE", status=500, count=2, detail="mirror trouble")
    results = run(ansible, "import_vm.yml",
                  import_vars(lab, boot, data, quick_import_move_retries=0))  # fmt: skip
    (failed,) = failures(results)
    assert "2 of 2 disk moves failed; the VMs keep running from their exports" in failed["msg"]
    assert "mirror trouble" in failed["msg"] or "Migrating Disk" in failed["msg"]
    assert vm_state(lab)["status"] == "up"
    assert {lab.hooks.volume(d["id"])["domain"] for d in vm_disks(lab)} == {lab.scratch_domain}
    assert len(exports_of(tmp_path)) == 2
    lab.hooks.guest_write(vm["id"], data_id, 24 * MiB, 65536, 0x22)
    writes.append((24 * MiB, 0x22))
    finish_and_check(lab, ansible, con, data, vm, data_id, writes, tmp_path)


def test_export_killed_during_the_move(lab, ansible, con, sources, tmp_path):
    boot, data = sources
    vm, data_id = preview_up(lab, ansible, con, boot, data)
    lab.hooks.guest_write(vm["id"], data_id, 16 * MiB, 65536, 0x11)
    writes = [(16 * MiB, 0x11)]
    # The mirrors wait a little once started: the data disk's export dies then.
    lab.hooks.fail("/copy", method="MOVE", delay=3, count=2)
    outcome = {}
    runner = threading.Thread(
        target=lambda: outcome.update(results=run(ansible, "import_vm.yml", import_vars(
            lab, boot, data, quick_import_move_retries=0)))
    )  # fmt: skip
    runner.start()
    try:
        wait_for(lambda: vm_state(lab)["block_jobs"], 60, "the mirrors to run")
        subprocess.run(["pkill", "-9", "-f", f"qemu-nbd.*{data}"], check=True)
    finally:
        runner.join()
    failed = failures(outcome["results"])
    assert failed and "disk moves failed" in failed[-1]["msg"]
    assert vm_state(lab)["status"] in ("up", "paused")
    finish_and_check(lab, ansible, con, data, vm, data_id, writes, tmp_path)
