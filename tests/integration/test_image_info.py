# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import json
import subprocess

import pytest
from ovirt_imageio import client as imageio_client

from tests.helpers import running

MiB = 1024**2


def qemu_img(*args):
    out = subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.fixture
def qcow2(tmp_path):
    path = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 1M 3M", "-c", "write -P 0x17 40M 1M", path],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return path


def test_adhoc_matches_qemu_img(ansible, qcow2):
    result = ansible.module("thinair.ovirt.image_info", f"image={qcow2}")

    info = qemu_img("info", "--output=json", qcow2)
    assert result["changed"] is False
    assert result["format"] == "qcow2"
    assert result["virtual_size"] == info["virtual-size"] == 64 * MiB
    assert result["actual_size"] == info["actual-size"]
    for target in ("qcow2", "raw"):
        measured = qemu_img("measure", "--output=json", "-O", target, qcow2)
        assert result["measure"][target] == {
            "required": measured["required"],
            "fully_allocated": measured["fully-allocated"],
        }
    assert result["data_bytes"] == 4 * MiB
    assert result["zero_bytes"] == 60 * MiB
    assert result["iso"] is False


def test_checksum_matches_imageio(ansible, qcow2):
    (result,) = ansible.playbook([{"thinair.ovirt.image_info": {"image": qcow2, "checksum": True}}])
    assert result["checksum"] == imageio_client.checksum(qcow2)


def test_iso_is_detected(ansible, tmp_path):
    iso = tmp_path / "boot.iso"
    with open(iso, "wb") as f:
        f.truncate(2 * MiB)
        f.seek(0x8000)
        f.write(b"\x01CD001\x01\x00")
    (result,) = ansible.playbook([{"thinair.ovirt.image_info": {"image": str(iso)}}])
    assert result["format"] == "raw"
    assert result["iso"] is True


def test_nbd_url(ansible, qcow2, tmp_path):
    sock = str(tmp_path / "nbd.sock")
    cmd = ["qemu-nbd", "--read-only", "--persistent", "-f", "qcow2", f"--socket={sock}", qcow2]
    with running(cmd, sock):
        (result,) = ansible.playbook(
            [{"thinair.ovirt.image_info": {"image": f"nbd:unix:{sock}", "checksum": True}}]
        )
    assert result["format"] == "raw"
    assert result["virtual_size"] == 64 * MiB
    assert result["data_bytes"] == 4 * MiB
    assert result["checksum"] == imageio_client.checksum(qcow2)


def truncated_qcow2(path):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 8M", str(path)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with open(path, "r+b") as f:
        f.truncate(4 * MiB)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (truncated_qcow2, "is corrupt"),
    ],
    ids=["missing", "directory", "truncated-qcow2"],
)
def test_bad_image(ansible, tmp_path, make, message):
    image = tmp_path / "bad.img"
    make(image)
    (result,) = ansible.playbook(
        [{"thinair.ovirt.image_info": {"image": str(image)}, "ignore_errors": True}]
    )
    assert result["failed"] is True
    assert str(image) in result["msg"]
    assert message in result["msg"]


def test_nothing_listening(ansible, tmp_path):
    url = f"nbd+unix:///?socket={tmp_path}/nothing.sock"
    (result,) = ansible.playbook(
        [{"thinair.ovirt.image_info": {"image": url}, "ignore_errors": True}]
    )
    assert result["failed"] is True
    assert "nothing.sock" in result["msg"]
