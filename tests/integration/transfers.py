# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""What the disk_upload and disk_download tests share: images, the modules
run through ansible-playbook, result checks, and the lab state that must be
left as it was."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
import time

from ansible_collections.thinair.ovirt.plugins.module_utils import _qemu_nbd

MiB = 1024**2
IMAGE_SIZE = 32 * MiB
FINAL_PHASES = ("finished_success", "finished_failure")


def make_raw(path, size=IMAGE_SIZE, seed=1):
    """A raw image with data at odd places, allocated zeros and holes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in ((0, MiB), (5 * MiB + 4096, 512 * 1024), (size - 64 * 1024, 65536)):
            f.seek(offset)
            f.write(rng.randbytes(length))
        # Allocated, but zero: the copy must see it as zero, not data.
        f.seek(12 * MiB)
        f.write(bytes(MiB))
    return str(path)


def make_full_raw(path, size, data, seed=3):
    """A raw image holding data bytes of incompressible data from the start."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(random.Random(seed).randbytes(data))
    return str(path)


def assert_same(image, other):
    proc = subprocess.run(
        ["qemu-img", "compare", image, other], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Images are identical" in proc.stdout


def auth_of(info):
    return {
        "url": info["engine_url"],
        "username": info["username"],
        "password": info["password"],
        "ca_file": info["ca_file"],
    }


class Modules:
    """disk_upload and disk_download tasks with the lab's auth, run by
    ansible-playbook; module temporary files go to a private TMPDIR."""

    def __init__(self, ansible, auth, tmp_path):
        self.ansible = ansible
        self.auth = auth
        self.tmpdir = tmp_path / "node-tmp"
        self.tmpdir.mkdir(exist_ok=True)
        ansible.env["TMPDIR"] = str(self.tmpdir)
        # Where the modules keep their records of open transfers.
        ansible.env["XDG_STATE_HOME"] = str(tmp_path / "node-state")

    def upload(self, **args):
        return self._task("thinair.ovirt.disk_upload", args)

    def download(self, **args):
        return self._task("thinair.ovirt.disk_download", args)

    def run(self, *tasks, check=False):
        """Run the tasks in one playbook; a failed task does not stop the others."""
        results = self.ansible.playbook(list(tasks), check=check)
        assert len(results) == len(tasks), results
        return results

    def run_one(self, task, check=False):
        (result,) = self.run(task, check=check)
        return result

    def _task(self, module, args):
        args = dict(args)
        args.setdefault("auth", self.auth)
        return {"name": module, module: args, "ignore_errors": True}


def ok(result, changed):
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is changed, result
    return result


def failed(result, message):
    assert result.get("failed") is True, result
    assert message in result["msg"], result["msg"]
    return result


class LabState:
    """What the lab holds before a test, to check what the test left."""

    def __init__(self, lab, tmp_path, keep_pids=()):
        self.lab = lab
        self.tmp_path = tmp_path
        self.keep_pids = set(keep_pids)
        state = lab.hooks.settled()
        self.disks = {d["id"] for d in state["disks"]}
        self.processes = sorted(state["processes"])
        self.transfers = {t.id for t in self.image_transfers()}
        self.open_transfers = self.transfers_in_progress()

    def image_transfers(self):
        with contextlib.closing(self.lab.connection()) as con:
            return con.system_service().image_transfers_service().list()

    def transfers_in_progress(self):
        """Ids of image transfers the engine lists in a non-final phase."""
        return {t.id for t in self.image_transfers() if str(t.phase) not in FINAL_PHASES}

    def new_transfers(self, direction):
        """The image transfers made since, in one direction."""
        return [
            t
            for t in self.image_transfers()
            if t.id not in self.transfers and str(t.direction) == direction
        ]

    def assert_nothing_left(self, disks=(), imageio_restarted=False):
        """Nothing new but the given disks; checked at once, not after a wait:
        the module returns only when the engine is done."""
        state = self.lab.hooks.state()
        assert {d["id"] for d in state["disks"]} - self.disks == set(disks)
        for disk in state["disks"]:
            if disk["id"] in disks:
                assert disk["status"] == "ok", disk
        assert self.transfers_in_progress() <= self.open_transfers
        assert set(state["open_transfers"]) == self.open_transfers
        assert state["tickets"] == [] and state["nbd_servers"] == [], state
        if not imageio_restarted:
            assert sorted(state["processes"]) == self.processes
        assert local_exports(self.tmp_path, self.keep_pids) == []
        assert os.listdir(self.tmp_path / "node-tmp") == []
        records = self.tmp_path / "node-state" / "thinair.ovirt" / "transfers"
        assert not records.exists() or os.listdir(records) == []

    def remove_new_disks(self):
        state = self.lab.hooks.settled()
        with contextlib.closing(self.lab.connection()) as con:
            disks = con.system_service().disks_service()
            for disk in state["disks"]:
                if disk["id"] not in self.disks:
                    disks.disk_service(disk["id"]).remove()
        self.lab.hooks.settled()


def local_exports(tmp_path, keep_pids=()):
    """qemu-nbd servers on this machine serving one of our files."""
    return [
        e
        for e in _qemu_nbd.find_exports()
        if e.pid not in keep_pids and str(tmp_path) in " ".join(e.argv)
    ]


def run_in_background(modules, *tasks):
    """Start a playbook in a thread; join() returns its results."""
    results = []
    thread = threading.Thread(target=lambda: results.extend(modules.run(*tasks)), daemon=True)
    thread.start()

    def join(timeout=180):
        thread.join(timeout)
        assert not thread.is_alive(), "the playbook did not end"
        return results

    return join


def wait_for(predicate, timeout=60, what="the condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def read_progress(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def with_changes(args, changes, fill, auth):
    """args changed as a bad-input case says: auth keys merged, None removes an option."""
    args = dict(args)
    for key, value in changes.items():
        if key == "auth":
            args["auth"] = dict(auth, **{k: fill(v) for k, v in value.items()})
        elif value is None:
            del args[key]
        else:
            args[key] = fill(value)
    return args


def assert_cases_failed(cases, results, fill):
    """Each bad-input case ran twice (check mode, then for real) and failed with its message."""
    for i, (case, (_changes, message)) in enumerate(cases.items()):
        for result in results[2 * i : 2 * i + 2]:
            assert result.get("failed") is True, (case, result)
            assert fill(message) in result["msg"], (case, result["msg"])
            assert "Traceback" not in result["msg"]
