# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Opening an image once (_image.open_source): its facts, who reads it, the
lock held while it is open, and the errors of images qemu cannot serve."""

from __future__ import annotations

import subprocess

import pytest

from ansible_collections.thinair.ovirt.plugins.module_utils import (
    _file,
    _image,
    _nbd_endpoint,
    _qemu_img,
    _qemu_nbd,
)

MiB = 1024**2
SIZE = 16 * MiB
# (offset, length) of the data each image holds; the rest reads as zeros.
DATA = ((0, MiB), (5 * MiB, 2 * MiB), (15 * MiB, MiB))
KINDS = ("raw", "qcow2", "compressed")


def qemu_io(path, fmt, *commands):
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run([*argv, path], capture_output=True, text=True, check=False)


@pytest.fixture
def images(tmp_path):
    raw = str(tmp_path / "image.raw")
    with open(raw, "wb") as f:
        f.truncate(SIZE)
    writes = [f"write -P 0x{0x41 + i:x} {offset} {length}" for i, (offset, length) in
              enumerate(DATA)]  # fmt: skip
    assert qemu_io(raw, "raw", *writes).returncode == 0
    paths = {"raw": raw}
    paths["qcow2"] = str(tmp_path / "image.qcow2")
    paths["compressed"] = str(tmp_path / "compressed.qcow2")
    for name, extra in (("qcow2", []), ("compressed", ["-c"])):
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", *extra, raw,
                        paths[name]], check=True)  # fmt: skip
    return paths


@pytest.mark.parametrize("kind", KINDS)
def test_facts(images, kind):
    facts = _image.inspect(images[kind])
    assert facts["format"] == ("raw" if kind == "raw" else "qcow2")
    assert facts["virtual_size"] == SIZE
    assert facts["data_bytes"] == sum(length for _offset, length in DATA)
    assert facts["zero_bytes"] == SIZE - facts["data_bytes"]
    assert facts["measure"]["raw"] == {"required": SIZE, "fully_allocated": SIZE}
    assert facts["iso"] is False


@pytest.mark.parametrize(
    ("kind", "reader"),
    [("raw", _file.FileReader), ("qcow2", _file.FileReader),
     ("compressed", _nbd_endpoint.NbdEndpoint)],
)  # fmt: skip
def test_who_reads_the_image(images, kind, reader):
    # Data in the file itself is read from it; compressed clusters need qemu.
    with _image.open_source(images[kind]) as source:
        assert isinstance(source.endpoint, reader)
        for i, (offset, length) in enumerate(DATA):
            buf = bytearray(length)
            source.endpoint.readinto(offset, buf)
            assert buf == bytes([0x41 + i]) * length


@pytest.mark.parametrize("kind", KINDS)
def test_locked_while_open(images, kind):
    # What was planned from the facts is what is read: nobody writes meanwhile.
    path = images[kind]
    fmt = "raw" if kind == "raw" else "qcow2"
    with _image.open_source(path):
        proc = qemu_io(path, fmt, "write -P 0x99 0 64k")
        assert proc.returncode != 0
        assert 'Failed to get "write" lock' in proc.stderr
    assert qemu_io(path, fmt, "write -P 0x99 0 64k").returncode == 0


def test_nbd_url(images):
    with (
        _qemu_nbd.serve(images["qcow2"], fmt="qcow2") as export,
        _image.open_source(export.url) as source,
    ):
        assert isinstance(source.endpoint, _nbd_endpoint.NbdEndpoint)
        assert source.format == "raw"
        facts = source.facts()
        assert facts["virtual_size"] == SIZE
        assert facts["data_bytes"] == sum(length for _offset, length in DATA)


def test_corrupt_qcow2(images):
    # A qcow2 whose L1 table points past the end of the file.
    path = images["qcow2"]
    with open(path, "r+b") as f:
        f.seek(40)
        f.write((1 << 40).to_bytes(8, "big"))
    with pytest.raises(_qemu_img.QemuError) as e:
        _image.inspect(path)
    assert str(e.value).startswith(f"image '{path}' is corrupt: qemu-img check found 1 ")
