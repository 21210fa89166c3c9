# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The README's examples, run as a user would copy them."""

from __future__ import annotations

import os
import re
import subprocess

from tests.helpers import qemu_io
from tests.integration.conftest import ROOT
from tests.integration.transfers import auth_of

MiB = 1024**2


def readme_block(marker):
    """The README's first YAML block that contains marker."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL):
        if marker in block:
            return block
    raise AssertionError(f"No YAML block with {marker!r} in README.md")


def test_module_defaults_example(lab, ansible, tmp_path):
    # The action group sets auth for the engine's modules only: image_info
    # and nbd_export in the same play must not get it.
    play = readme_block("module_defaults:").replace("/var/tmp/", f"{tmp_path}/")
    image = str(tmp_path / "fedora-40.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(64 * MiB)], check=True)
    qemu_io(image, "qcow2", "write -P 0x42 0 4M", f"write -P 0x43 {32 * MiB} 1M")
    results = ansible.run(play, extra_vars={"ovirt_auth": auth_of(lab.info)})
    failed = [r for r in results if r.get("failed")]
    assert not failed, failed
    assert len(results) == 5
    assert results[0]["format"] == "qcow2"
    copy = str(tmp_path / "fedora-40-copy.qcow2")
    subprocess.run(["qemu-img", "compare", image, copy], check=True)
    assert not os.path.exists(str(tmp_path / "fedora-40-copy.sock"))
    con = lab.connection()
    try:
        con.system_service().disks_service().disk_service(results[1]["disk"]["id"]).remove()
    finally:
        con.close()
