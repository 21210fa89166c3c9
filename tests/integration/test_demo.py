# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""make demo's playbook, run as `make demo` runs it: on a lab of its own,
a VM imported out of thin air with its timeline, then a preview rolled back."""

from __future__ import annotations

import os
import re
import subprocess

from tests.integration.conftest import BIN, ROOT


def test_quick_import_demo(ansible):
    proc = subprocess.run(
        [os.path.join(BIN, "ansible-playbook"), "demo/quick_import.yml"],
        cwd=ROOT,
        env=ansible.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    out = proc.stdout
    events = re.findall(r'"\s*([\d.]+) s  ([^"]+)"', out)
    assert [e[1] for e in events][:3] == ["exports running", "disks created",
                                          "VM running (powering_up)"]  # fmt: skip
    assert events[-1][1] == "exports stopped"
    assert "web1 is up; its disks: web1-disk1 on iscsi1, web1-disk2 on iscsi1" in out
    assert "web2 is rolled back, no export is left, and the four source images are unchanged" in out
