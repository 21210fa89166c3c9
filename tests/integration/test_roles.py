# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The upload_disk and download_disk roles, run as users run them: the
playbooks playbooks/upload_disk.yml and playbooks/download_disk.yml with
ansible-playbook and extra vars, against the lab.

Each round trip is compared with qemu-img compare, each playbook is run a
second time to see it change nothing, and each failure is checked to leave
nothing behind: no disk, no open transfer, no process, no progress record, no
async job record, no partial file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.helpers import qemu_io, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)

MiB = 1024**2
IMAGE_SIZE = 16 * MiB

# The NBD servers of the lab's host answer each request after this delay
# while the slow uploads run; with 64 KiB requests over one connection, 8 MiB
# of data take about 13 s, long enough for several progress lines.
SLOW_STORAGE_MS = 100
SLOW_BUFFER_SIZE = 64 * 1024

# "disk-a.qcow2: uploading 45.2% 1.1 MiB/s ETA 6 s"
PROGRESS_LINE = re.compile(
    r"\(item=(?P<label>[\w.-]+): (?P<phase>uploading|downloading) (?P<percent>\d+\.\d)%"
    r"(?: (?P<rate>\d+\.\d) (?:B|KiB|MiB|GiB|TiB)/s)?(?: ETA \d+ (?:s|min))?\)"
)
RECAP = re.compile(
    r"localhost\s+: ok=\d+\s+changed=(?P<changed>\d+)\s+unreachable=0\s+failed=(?P<failed>\d+)"
)


class Run:
    """What one ansible-playbook run printed and returned."""

    def __init__(self, proc, results):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.results = results
        recap = RECAP.search(self.stdout)
        assert recap, self.output
        self.changed = int(recap["changed"])
        self.failed = int(recap["failed"])

    @property
    def output(self):
        return f"{self.stdout}\n{self.stderr}"

    def fact(self, task, name):
        """The fact a set_fact task of a role (by name) set."""
        for result in self.results:
            if result["task"].endswith(f" : {task}") and name in result.get("ansible_facts", {}):
                return result["ansible_facts"][name]
        raise AssertionError(f"no task {task!r} set {name}:\n{self.output}")

    def progress(self):
        """(label, phase, percent, rate) of every progress line, in order."""
        return [
            (m["label"], m["phase"], float(m["percent"]), m["rate"])
            for m in PROGRESS_LINE.finditer(self.stdout)
        ]


class Playbooks:
    """The role playbooks, run from the repository root with the inventory and
    callback of the `ansible` fixture. The node's temporary files and async
    job records go to private directories, so a test sees what a run left."""

    def __init__(self, ansible, lab, tmp_path):
        self.ansible = ansible
        self.lab = lab
        self.node_tmp = tmp_path / "node-tmp"
        self.async_dir = tmp_path / "async"
        self.node_tmp.mkdir()
        self.async_dir.mkdir()
        self.env = dict(
            ansible.env, TMPDIR=str(self.node_tmp), ANSIBLE_ASYNC_DIR=str(self.async_dir)
        )
        self.auth = {
            "url": lab.engine_url,
            "username": lab.username,
            "password": lab.password,
            "ca_file": lab.ca_file,
        }

    def upload(self, disks, auth=True, env=None, **variables):
        if auth:
            variables["upload_disk_auth"] = self.auth
        return self.run("upload_disk.yml", dict(variables, upload_disk_disks=disks), env)

    def download(self, disks, **variables):
        variables["download_disk_auth"] = self.auth
        return self.run("download_disk.yml", dict(variables, download_disk_disks=disks))

    def start(self, playbook, variables):
        """Start a playbook in a session of its own; the process."""
        return subprocess.Popen(
            self._command(playbook, variables),
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _command(self, playbook, variables):
        extra_vars = self.ansible.tmp_path / "extra-vars.json"
        extra_vars.write_text(json.dumps(variables))
        return [
            os.path.join(BIN, "ansible-playbook"),
            "-i",
            self.ansible.inventory,
            os.path.join("playbooks", playbook),
            "-e",
            f"@{extra_vars}",
        ]

    def run(self, playbook, variables, env=None):
        cmd = self._command(playbook, variables)
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=dict(self.env, **(env or {})),
            capture_output=True,
            text=True,
            check=False,
        )
        results_file = self.ansible.results
        assert results_file.exists(), (
            f"ansible-playbook did not finish:\n{proc.stdout}{proc.stderr}"
        )
        results = json.loads(results_file.read_text())
        results_file.unlink()
        return Run(proc, results)


@pytest.fixture
def playbooks(ansible, lab, tmp_path):
    return Playbooks(ansible, lab, tmp_path)


class LabState:
    """The lab before a test, to see what the test left behind; the disks the
    test made are removed after it."""

    def __init__(self, lab):
        self.lab = lab
        state = lab.hooks.settled()
        self.disks = {d["id"] for d in state["disks"]}
        self.processes = sorted(state["processes"])

    def new_disks(self):
        """name -> disk of each disk made since the test started."""
        return {d["alias"]: d for d in self.lab.hooks.state()["disks"] if d["id"] not in self.disks}

    def assert_settled(self):
        """No transfer, ticket, NBD server or job left; nothing added to the host's processes."""
        state = self.lab.hooks.settled(timeout=30)
        assert sorted(state["processes"]) == self.processes

    def remove_new_disks(self):
        self.lab.hooks.settled(timeout=60)
        with contextlib.closing(self.lab.connection()) as con:
            service = con.system_service().disks_service()
            for disk in self.new_disks().values():
                service.disk_service(disk["id"]).remove()
        self.lab.hooks.settled(timeout=60)


@pytest.fixture
def lab_state(lab):
    lab.hooks.slow_storage(0)
    state = LabState(lab)
    yield state
    lab.hooks.slow_storage(0)
    state.remove_new_disks()


def processes_using(path):
    """Command lines of processes on this machine that name a file under path."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            if any(str(path) in arg for arg in argv):
                found.append(" ".join(argv))
    return found


def assert_nothing_left(playbooks, lab_state, tmp_path):
    lab_state.assert_settled()
    assert os.listdir(playbooks.node_tmp) == []
    assert os.listdir(playbooks.async_dir) == []
    assert processes_using(tmp_path) == []


@pytest.fixture
def images(tmp_path):
    """Two 16 MiB images with 8 MiB of data each, at different places."""
    a = str(tmp_path / "disk-a.qcow2")
    b = str(tmp_path / "disk-b.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", a, str(IMAGE_SIZE)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", b, str(IMAGE_SIZE)], check=True)
    qemu_io(a, "qcow2", "write -P 0x61 0 3M", "write -P 0x62 7M 3M", "write -P 0x63 14M 2M")
    qemu_io(b, "raw", "write -P 0x71 1M 4M", "write -P 0x72 9M 4M")
    return {"a": a, "b": b}


def data_bytes(image):
    """Bytes of the image that read as data, as qemu-img map sees them."""
    proc = subprocess.run(
        ["qemu-img", "map", "--output=json", image], capture_output=True, text=True, check=True
    )
    return sum(e["length"] for e in json.loads(proc.stdout) if e["data"])


def assert_same(image, fmt, copy, copy_fmt):
    proc = subprocess.run(
        ["qemu-img", "compare", "-f", fmt, "-F", copy_fmt, image, copy],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Images are identical" in proc.stdout


def unique(name):
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_upload_then_download_two_disks(playbooks, lab, lab_state, images, tmp_path):
    names = {"a": unique("roles-a"), "b": unique("roles-b")}
    uploads = [
        {"image": images["a"], "name": names["a"], "storage_domain": lab.file_domain},
        {"image": images["b"], "name": names["b"], "storage_domain": lab.block_domain},
    ]
    # Slow enough for progress lines; auth from the environment, as an AWX
    # credential passes it.
    lab.hooks.slow_storage(SLOW_STORAGE_MS)
    env = {
        "OVIRT_URL": lab.engine_url,
        "OVIRT_USERNAME": lab.username,
        "OVIRT_PASSWORD": lab.password,
        "OVIRT_CAFILE": lab.ca_file,
    }
    run = playbooks.upload(
        uploads,
        auth=False,
        env=env,
        upload_disk_max_workers=1,
        upload_disk_buffer_size=SLOW_BUFFER_SIZE,
        upload_disk_progress_interval=1,
    )
    lab.hooks.slow_storage(0)
    assert run.rc == 0, run.output
    assert run.changed == 1, run.output

    # Progress lines of both disks, taking turns while both run, each with a
    # growing percentage.
    progress = run.progress()
    turns = {key: [i for i, line in enumerate(progress) if line[0] == names[key]] for key in names}
    assert turns["a"] and turns["b"], run.stdout
    assert turns["b"][0] < turns["a"][-1] and turns["a"][0] < turns["b"][-1], run.stdout
    for key in names:
        percents = [progress[i][2] for i in turns[key]]
        assert percents == sorted(percents), run.stdout
        assert any(0 < p < 100 for p in percents), run.stdout
    assert any(line[-1] for line in progress), run.stdout

    results = run.fact("Keep the results of the uploads", "upload_disk_results")
    assert [r["item"]["name"] for r in results] == [names["a"], names["b"]]
    disks = lab_state.new_disks()
    for result, key in zip(results, ("a", "b"), strict=True):
        assert result["changed"] is True
        assert result["disk"]["name"] == names[key]
        assert result["disk"]["id"] == disks[names[key]]["id"]
        assert result["disk"]["status"] == "ok"
        assert result["transfer"]["data_bytes"] == data_bytes(images[key])
        assert result["transfer"]["connections"] == 1
    assert results[0]["disk"]["storage_domain"] == lab.file_domain
    assert results[1]["disk"]["storage_domain"] == lab.block_domain
    assert_nothing_left(playbooks, lab_state, tmp_path)

    copies = {"a": str(tmp_path / "copy-a.raw"), "b": str(tmp_path / "copy-b.qcow2")}
    downloads = [
        {"name": names["a"], "dest": copies["a"], "format": "raw"},
        {"disk_id": results[1]["disk"]["id"], "dest": copies["b"]},
    ]
    # Slow enough for a progress line before the downloads end.
    lab.hooks.slow_storage(SLOW_STORAGE_MS // 4)
    run = playbooks.download(
        downloads,
        download_disk_progress_interval=1,
        download_disk_max_workers=1,
        download_disk_buffer_size=SLOW_BUFFER_SIZE,
    )
    lab.hooks.slow_storage(0)
    assert run.rc == 0, run.output
    assert run.changed == 1, run.output
    assert re.search(r"\(item=copy-[ab]\.\w+: ", run.stdout), run.stdout
    results = run.fact("Keep the results of the downloads", "download_disk_results")
    assert [r["dest"] for r in results] == [copies["a"], copies["b"]]
    assert [r["format"] for r in results] == ["raw", "qcow2"]
    assert all(r["changed"] for r in results)
    assert_same(images["a"], "qcow2", copies["a"], "raw")
    assert_same(images["b"], "raw", copies["b"], "qcow2")
    assert_nothing_left(playbooks, lab_state, tmp_path)

    # Again: the disks hold the images and the images hold the disks.
    run = playbooks.upload(uploads, upload_disk_progress_interval=1)
    assert run.rc == 0, run.output
    assert run.changed == 0, run.output
    results = run.fact("Keep the results of the uploads", "upload_disk_results")
    assert [r["changed"] for r in results] == [False, False]
    assert "already holds the image, left as it is" in run.stdout
    run = playbooks.download(downloads, download_disk_progress_interval=1)
    assert run.rc == 0, run.output
    assert run.changed == 0, run.output
    results = run.fact("Keep the results of the downloads", "download_disk_results")
    assert [r["changed"] for r in results] == [False, False]
    assert set(lab_state.new_disks()) == set(names.values())
    assert_nothing_left(playbooks, lab_state, tmp_path)


def test_no_secret_at_any_verbosity(playbooks, lab, lab_state, images, tmp_path):
    """An upload and a download through the roles at -vvvv, with a log file:
    the password is in no output, log or file the run leaves, and no record
    of a background job is left."""
    name = unique("roles-secret")
    log = tmp_path / "ansible.log"
    async_dir = tmp_path / "async"
    env = {
        "ANSIBLE_VERBOSITY": "4",
        "ANSIBLE_LOG_PATH": str(log),
        "ANSIBLE_ASYNC_DIR": str(async_dir),
        "ANSIBLE_KEEP_REMOTE_FILES": "0",
    }
    up = playbooks.run(
        "upload_disk.yml",
        {
            "upload_disk_auth": playbooks.auth,
            "upload_disk_disks": [
                {"image": images["a"], "name": name, "storage_domain": lab.file_domain}
            ],
        },
        env,
    )
    assert up.rc == 0, up.output
    down = playbooks.run(
        "download_disk.yml",
        {
            "download_disk_auth": playbooks.auth,
            "download_disk_disks": [{"name": name, "dest": str(tmp_path / "back.qcow2")}],
        },
        env,
    )
    assert down.rc == 0, down.output
    password = lab.password
    assert password not in up.output and password not in down.output
    assert log.exists() and password not in log.read_text()
    # The roles clean up their background jobs' records.
    assert [p for p in async_dir.rglob("*") if p.is_file()] == []
    # The test's own extra vars hold the password, as a user's vault would.
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "extra-vars.json":
            assert password.encode() not in path.read_bytes(), path


def test_playbook_killed_while_the_role_uploads(playbooks, lab, lab_state, tmp_path):
    """ansible-playbook is killed outright (an AWX job's cancel) while the
    role's uploads run in the background, where no signal reaches them: once
    their heartbeat goes stale, they stop and undo their work."""
    # 32 MiB of data from slow storage: almost a minute.
    image = str(tmp_path / "long.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", image, "32M"], check=True)
    qemu_io(image, "raw", "write -P 0x6b 0 32M")
    lab.hooks.slow_storage(SLOW_STORAGE_MS)
    variables = {
        "upload_disk_auth": playbooks.auth,
        "upload_disk_disks": [
            {
                "image": image,
                "name": unique("roles-killed"),
                "storage_domain": lab.file_domain,
            }
        ],
        "upload_disk_max_workers": 1,
        "upload_disk_buffer_size": SLOW_BUFFER_SIZE,
        "upload_disk_progress_interval": 1,
    }
    playbook = playbooks.start("upload_disk.yml", variables)
    try:
        wait_for(lambda: transferred(lab) > 0, 60, "data to move")
        # Past the first round of the follow loop, which arms the heartbeat.
        time.sleep(2)
        os.killpg(playbook.pid, signal.SIGKILL)
    finally:
        playbook.kill()
        playbook.wait()
        # Ansible's workers run in sessions of their own: those the kill
        # left waiting on the dead controller go too, as in a killed job.
        for pid in processes_of(playbooks.ansible.inventory):
            os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    assert lab.hooks.state()["open_transfers"], "the upload ended before the playbook was killed"
    # The heartbeat times out after 3 progress intervals and 10 s.
    wait_for(
        lambda: not lab.hooks.state()["open_transfers"] and not lab_state.new_disks(),
        30,
        "the background upload to stop and undo its work",
    )
    assert time.monotonic() - killed >= 10
    lab.hooks.slow_storage(0)
    lab_state.assert_settled()


def processes_of(inventory):
    """Processes of an ansible-playbook run with this inventory."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            continue
        if inventory.encode() in cmdline:
            found.append(int(pid))
    return found


def transferred(lab):
    """Bytes the open transfers have moved, as the engine reports them."""
    with contextlib.closing(lab.connection()) as con:
        transfers = con.system_service().image_transfers_service().list()
    return sum(t.transferred or 0 for t in transfers if str(t.phase) == "transferring")


def test_one_bad_upload_fails_the_role(playbooks, lab, lab_state, images, tmp_path):
    good, bad = unique("roles-good"), unique("roles-bad")
    uploads = [
        {"image": images["a"], "name": good, "storage_domain": lab.file_domain},
        {"image": images["b"], "name": bad, "storage_domain": "no-such-domain"},
    ]
    run = playbooks.upload(uploads, upload_disk_progress_interval=1)
    assert run.rc != 0
    assert run.failed == 1, run.output
    assert re.search(rf"1 of 2 uploads failed: {bad}: [^\n]*no-such-domain", run.stdout), run.output
    # The good upload went on to its end.
    results = run.fact("Keep the results of the uploads", "upload_disk_results")
    assert results[0]["changed"] is True and results[0]["disk"]["status"] == "ok"
    assert results[1]["failed"] is True and "no-such-domain" in results[1]["msg"]
    assert set(lab_state.new_disks()) == {good}
    assert_nothing_left(playbooks, lab_state, tmp_path)


def test_one_bad_download_fails_the_role(playbooks, lab, lab_state, images, tmp_path):
    name = unique("roles-src")
    run = playbooks.upload(
        [{"image": images["b"], "name": name}], upload_disk_storage_domain="nfs1"
    )
    assert run.rc == 0, run.output

    out = tmp_path / "out"
    out.mkdir()
    downloads = [
        {"name": name, "dest": str(out / "good.qcow2")},
        {"name": unique("no-such-disk"), "dest": str(out / "bad.qcow2")},
    ]
    run = playbooks.download(downloads, download_disk_progress_interval=1)
    assert run.rc != 0
    assert run.failed == 1, run.output
    assert re.search(r"1 of 2 downloads failed: bad\.qcow2: [^\n]*not found", run.stdout), (
        run.output
    )
    assert os.listdir(out) == ["good.qcow2"]
    assert_same(images["b"], "raw", str(out / "good.qcow2"), "qcow2")
    assert set(lab_state.new_disks()) == {name}
    assert_nothing_left(playbooks, lab_state, tmp_path)


@pytest.mark.parametrize(
    "variables, message",
    [
        (
            {"upload_disk_disks": [{"name": "no-image"}]},
            "missing required arguments: image found in upload_disk_disks",
        ),
        (
            {"upload_disk_disks": [{"image": "/x.qcow2", "size": 1}]},
            "upload_disk_disks.size. Supported parameters include",
        ),
        (
            {
                "upload_disk_disks": [{"image": "/x.qcow2"}],
                "upload_disk_progress_interval": 0,
            },
            "upload_disk_progress_interval must be more than 0 seconds",
        ),
    ],
)
def test_bad_role_input(playbooks, lab_state, tmp_path, variables, message):
    run = playbooks.run("upload_disk.yml", variables)
    assert run.rc != 0
    assert message in run.output
    assert set(lab_state.new_disks()) == set()
    assert_nothing_left(playbooks, lab_state, tmp_path)
