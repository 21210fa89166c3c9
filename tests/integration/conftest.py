# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Run the collection the way users do: ansible-playbook and ansible from the repo root."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from lab.pki import Pki
from tests.helpers import qemu_io, running

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)


class Ansible:
    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.results = tmp_path / "results.json"
        self.env = dict(
            os.environ,
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_CALLBACK_PLUGINS=os.path.join(HERE, "callback_plugins"),
            ANSIBLE_CALLBACKS_ENABLED="results_file",
            THINAIR_TEST_RESULTS=str(self.results),
        )
        self.env["PATH"] = BIN + os.pathsep + self.env.get("PATH", "")
        # Modules run with the interpreter that runs Ansible, as for the implicit localhost.
        inventory = tmp_path / "inventory"
        inventory.write_text(
            f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"
        )
        self.inventory = str(inventory)

    def playbook(self, tasks, check=False, extra_vars=None):
        """Run tasks on localhost; return the task results in order (failed ones too)."""
        play = [{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]
        return self.run(yaml.safe_dump(play), check, extra_vars)

    def start(self, tasks):
        """Start ansible-playbook running tasks on localhost, in a session of
        its own (a terminal's Ctrl-C signals the whole process group)."""
        play = [{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]
        return subprocess.Popen(
            self._command(yaml.safe_dump(play)),
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def run(self, playbook, check=False, extra_vars=None):
        """Run a playbook given as YAML text; the task results in order."""
        cmd = self._command(playbook)
        if check:
            cmd.append("--check")
        if extra_vars:
            cmd += ["-e", json.dumps(extra_vars)]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, check=False
        )
        if not self.results.exists():
            raise AssertionError(f"ansible-playbook failed:\n{proc.stdout}\n{proc.stderr}")
        results = json.loads(self.results.read_text())
        self.results.unlink()
        return results

    def _command(self, playbook):
        path = self.tmp_path / "playbook.yml"
        path.write_text(playbook)
        return [os.path.join(BIN, "ansible-playbook"), "-i", self.inventory, str(path)]

    def module(self, name, args):
        """Run one module with `ansible localhost -m`; return its result."""
        cmd = [os.path.join(BIN, "ansible"), "localhost", "-m", name, "-a", args]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, check=False
        )
        sep, body = proc.stdout.partition("=>")[1:]
        if not sep:
            raise AssertionError(f"ansible failed:\n{proc.stdout}\n{proc.stderr}")
        return json.loads(body)


@pytest.fixture
def ansible(tmp_path):
    return Ansible(tmp_path)


@pytest.fixture
def other_ca(tmp_path):
    """A CA that did not sign the engine's certificate."""
    return Pki(str(tmp_path / "other-ca")).ca_cert


@pytest.fixture
def export(tmp_path):
    """A raw image with data, exported read-only by qemu-nbd on a unix socket."""
    image = str(tmp_path / "source.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", image, "64M"], check=True)
    qemu_io(image, "raw", "write -P 0x5e 0 8M")
    sock = str(tmp_path / "source.sock")
    cmd = ["qemu-nbd", "--read-only", "--persistent", "-f", "raw", "--socket", sock, image]
    with running(cmd, sock):
        yield image, f"nbd:unix:{sock}"
