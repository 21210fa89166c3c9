# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import subprocess

import pytest
from ovirt_imageio import client as imageio_client

from ansible_collections.thinair.ovirt.plugins.module_utils import _checksum, _image, _qemu_img

MiB = 1024**2


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The same guest data as raw, qcow2 and compressed qcow2, 9 MiB + 12 KiB."""
    tmp = tmp_path_factory.mktemp("checksum")
    qcow2 = str(tmp / "image.qcow2")
    _qemu_img.create(qcow2, "qcow2", 9 * MiB + 12 * 1024)
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 4M 8k",
            "-c",
            "write -z 5M 1M",
            "-c",
            "write -P 0x33 9M 12k",
            qcow2,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    raw = str(tmp / "image.raw")
    compressed = str(tmp / "compressed.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "raw", qcow2, raw], check=True)
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", qcow2, compressed], check=True)
    return {"raw": raw, "qcow2": qcow2, "compressed": compressed}


def ours(image, **kwargs):
    fmt = _qemu_img.info(image)["format"]
    with _image.open_endpoint(image, fmt) as endpoint:
        return _checksum.checksum(endpoint, **kwargs)


@pytest.mark.parametrize("kind", ["raw", "qcow2", "compressed"])
@pytest.mark.parametrize("block_size", [64 * 1024, 1 * MiB, 4 * MiB])
def test_matches_imageio(images, kind, block_size):
    expected = imageio_client.checksum(images[kind], block_size=block_size)
    assert ours(images[kind], block_size=block_size) == expected


@pytest.mark.parametrize("algorithm", ["sha256", "blake2s", "sha1"])
def test_other_algorithms_match_imageio(images, algorithm):
    expected = imageio_client.checksum(images["qcow2"], algorithm=algorithm)
    assert ours(images["qcow2"], algorithm=algorithm) == expected


def test_same_data_same_checksum_in_every_format(images):
    values = {ours(path)["checksum"] for path in images.values()}
    assert len(values) == 1


def test_checksum_changes_with_one_byte(images, tmp_path):
    changed = str(tmp_path / "changed.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", images["qcow2"], changed], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x01 7M 512", changed],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    assert ours(changed) != ours(images["qcow2"])


@pytest.mark.parametrize(
    "algorithm,block_size,message",
    [
        ("no-such-hash", 4 * MiB, "unsupported checksum algorithm 'no-such-hash'"),
        ("blake2b", 1000, "must be a multiple of 4 KiB"),
        ("blake2b", 32 * MiB, "between 4 KiB and 16 MiB"),
    ],
)
def test_bad_parameters(algorithm, block_size, message):
    with pytest.raises(ValueError, match=message):
        _checksum.BlockHash(algorithm, block_size)
