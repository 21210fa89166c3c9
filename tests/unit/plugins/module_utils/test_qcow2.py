# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The qcow2 size an image takes, computed from its extents, against what
qemu-img measure says of the same image."""

from __future__ import annotations

import json
import subprocess

import pytest

from ansible_collections.thinair.ovirt.plugins.module_utils import _image, _qcow2
from ansible_collections.thinair.ovirt.plugins.module_utils._bytes import GiB, KiB, MiB, TiB
from ansible_collections.thinair.ovirt.plugins.module_utils._copy import Extent
from tests.helpers import qemu_io

# (format, virtual size, qemu-io commands, qemu-img create options)
IMAGES = {
    "empty-raw": ("raw", 10 * GiB, [], []),
    "odd-size-raw": ("raw", 33 * MiB + 512, ["write -P 1 1M 4k", f"write -P 2 {33 * MiB} 512"], []),
    "unaligned-raw": ("raw", 64 * MiB, ["write -P 3 100k 5k", "write -P 4 130k 1k",
                                        "write -P 5 10M 3M", "write -z 11M 64k"], []),
    "qcow2-zero-clusters": ("qcow2", GiB, ["write -P 6 0 8M", "write -z 2M 2M",
                                           "write -P 7 700M 65537"], []),
    "qcow2-32k-clusters": ("qcow2", 3 * GiB, ["write -P 8 1G 1M"], ["-o", "cluster_size=32k"]),
    "sparse-4t-qcow2": ("qcow2", 4 * TiB, [f"write -P 9 {3 * TiB} 1M"], []),
    "vmdk": ("vmdk", 200 * MiB, ["write -P 10 5M 2M", "write -P 11 150M 100k"], []),
}  # fmt: skip


def qemu_img_measure(path, fmt):
    out = subprocess.run(
        ["qemu-img", "measure", "--output=json", "-f", fmt, "-O", "qcow2", path],
        check=True,
        capture_output=True,
    ).stdout
    measured = json.loads(out)
    return {"required": measured["required"], "fully_allocated": measured["fully-allocated"]}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_measure_matches_qemu_img(tmp_path, name):
    fmt, size, commands, options = IMAGES[name]
    path = str(tmp_path / name)
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *options, path, str(size)], check=True)
    if commands:
        qemu_io(path, fmt, *commands)
    with _image.open_source(path, fmt) as source:
        facts = source.facts()
    assert facts["measure"]["qcow2"] == qemu_img_measure(path, fmt)
    assert facts["data_bytes"] + facts["zero_bytes"] == size


@pytest.mark.parametrize("size", [0, 512, 64 * KiB, 64 * KiB + 1, GiB, 512 * GiB + 3 * 512,
                                  8 * TiB, 64 * TiB])  # fmt: skip
def test_fully_allocated_matches_qemu_img(tmp_path, size):
    path = str(tmp_path / "empty.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    assert _qcow2.measure(size, []) == qemu_img_measure(path, "qcow2")


def test_measure_counts_each_cluster_once():
    extents = [
        Extent(0, 10 * KiB, False, False),
        Extent(10 * KiB, 10 * KiB, True, True),
        Extent(20 * KiB, 10 * KiB, False, False),
        Extent(30 * KiB, 40 * KiB, True, False),
        Extent(70 * KiB, KiB, False, False),
        Extent(71 * KiB, MiB - 71 * KiB, True, True),
    ]
    empty = _qcow2.measure(MiB, [])
    assert _qcow2.measure(MiB, extents)["required"] == empty["required"] + 2 * 64 * KiB
    assert _qcow2.measure(MiB, extents)["fully_allocated"] == empty["fully_allocated"]
