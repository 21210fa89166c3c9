# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""thinair.ovirt.nbd_export run by ansible-playbook, read back with qemu-img."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

from ansible_collections.thinair.ovirt.plugins.module_utils import _qemu_nbd
from lab.pki import Pki

MiB = 1024**2
SIZE = 8 * MiB


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qemu_img(*args):
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def assert_identical(source, url, objects=()):
    """qemu-img compare of the source raw image and what the URL serves."""
    proc = qemu_img("compare", *objects, "-f", "raw", "-F", "raw", source, url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Images are identical" in proc.stdout


def live_pids():
    return {e.pid for e in _qemu_nbd.find_exports()}


@pytest.fixture
def images(tmp_path):
    """A raw image with data and holes, and the same data as qcow2."""
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        for offset in (0, 3 * MiB + 4096, SIZE - MiB):
            f.seek(offset)
            f.write(os.urandom(256 * 1024))
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow2], check=True)
    return {"raw": str(raw), "qcow2": str(qcow2)}


@pytest.fixture(autouse=True)
def no_export_left(tmp_path):
    """Fail a test that leaves an export of its files running, and stop it."""
    yield
    left = [e for e in _qemu_nbd.find_exports() if str(tmp_path) in " ".join(e.argv)]
    for export in left:
        _qemu_nbd.stop(export.pid)
    assert left == []


@pytest.fixture
def pki(tmp_path):
    ca = Pki(str(tmp_path / "ca"))
    other = Pki(str(tmp_path / "other-ca"))
    client = ca.qemu_dir("client", str(tmp_path / "tls-client"))
    # A client with the CA but no certificate of its own.
    anonymous = tmp_path / "tls-anonymous"
    anonymous.mkdir()
    shutil.copy(os.path.join(client, "ca-cert.pem"), anonymous / "ca-cert.pem")
    # A client whose certificate another CA signed.
    stranger = other.qemu_dir("client", str(tmp_path / "tls-stranger"))
    shutil.copy(os.path.join(client, "ca-cert.pem"), os.path.join(stranger, "ca-cert.pem"))
    return {
        "server": ca.qemu_dir("server", str(tmp_path / "tls-server")),
        "client": client,
        "anonymous": str(anonymous),
        "stranger": stranger,
    }


def export_task(**args):
    return {"thinair.ovirt.nbd_export": args}


def run(ansible, check=False, **args):
    (result,) = ansible.playbook([export_task(**args)], check=check)
    return result


def test_lifecycle(ansible, images):
    port = free_port()
    args = {"image": images["qcow2"], "port": port, "export_name": "disk1"}

    first = run(ansible, **args)
    assert first["changed"] is True
    assert first["url"] == f"nbd://127.0.0.1:{port}/disk1"
    assert (first["format"], first["export_name"], first["readonly"]) == ("qcow2", "disk1", True)
    assert first["image"] == images["qcow2"]
    assert first["size"] == SIZE
    assert "stopped_pid" not in first
    assert first["diff"]["before"] == {}
    assert first["diff"]["after"]["url"] == first["url"]
    assert _qemu_nbd.find_export(("tcp", "127.0.0.1", port)).pid == first["pid"]

    again = run(ansible, **args)
    assert again["changed"] is False
    assert (again["pid"], again["url"], again["command"]) == (
        first["pid"],
        first["url"],
        first["command"],
    )

    assert_identical(images["raw"], first["url"])
    # Read-only: a client cannot write.
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write 0 64k", first["url"]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "Permission denied" in proc.stderr

    writable = run(ansible, readonly=False, **args)
    assert writable["changed"] is True
    assert writable["readonly"] is False
    assert writable["stopped_pid"] == first["pid"]
    assert writable["pid"] != first["pid"]
    assert first["pid"] not in live_pids()
    assert writable["diff"]["before"]["readonly"] is True
    assert writable["diff"]["after"]["readonly"] is False
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", writable["url"]],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", images["raw"]],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    assert_identical(images["raw"], writable["url"])

    # Another image on the same endpoint replaces the export.
    raw = run(ansible, image=images["raw"], port=port, export_name="disk1")
    assert raw["changed"] is True
    assert raw["format"] == "raw"
    assert raw["stopped_pid"] == writable["pid"]
    assert_identical(images["raw"], raw["url"])

    gone = run(ansible, state="absent", port=port)
    assert gone["changed"] is True
    assert gone["stopped_pid"] == raw["pid"]
    assert raw["pid"] not in live_pids()
    assert _qemu_nbd.find_export(("tcp", "127.0.0.1", port)) is None
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass

    assert run(ansible, state="absent", port=port)["changed"] is False


def test_unix_socket(ansible, images, tmp_path):
    sock = str(tmp_path / "disk.sock")
    args = {"image": images["qcow2"], "socket": sock, "export_name": "vm 1/disk"}

    first = run(ansible, **args)
    assert first["changed"] is True
    assert first["url"] == f"nbd+unix:///vm%201/disk?socket={sock}"
    assert run(ansible, **args)["changed"] is False
    assert_identical(images["raw"], first["url"])

    gone = run(ansible, state="absent", socket=sock)
    assert gone["changed"] is True
    assert first["pid"] not in live_pids()
    assert not os.path.exists(sock)
    assert run(ansible, state="absent", socket=sock)["changed"] is False


def test_reexport_nbd_url(ansible, images, tmp_path):
    inner = run(ansible, image=images["qcow2"], socket=str(tmp_path / "inner.sock"))
    outer = run(ansible, image=inner["url"], socket=str(tmp_path / "outer.sock"))
    assert outer["changed"] is True
    assert outer["format"] == "raw"
    assert outer["image"] == inner["url"]
    assert_identical(images["raw"], outer["url"])
    for name in ("outer", "inner"):
        assert run(ansible, state="absent", socket=str(tmp_path / f"{name}.sock"))["changed"]


def test_tls(ansible, images, pki):
    port = free_port()
    args = {"image": images["qcow2"], "port": port, "tls_certs": pki["server"]}
    export = run(ansible, **args)
    assert export["changed"] is True
    assert export["url"] == f"nbds://127.0.0.1:{port}/"
    assert run(ansible, **args)["changed"] is False

    def client(directory):
        return [f"--object=tls-creds-x509,id=tls0,dir={directory},endpoint=client"]

    # qemu's own client, with the client certificate.
    objects = client(pki["client"])
    image = "json:" + json.dumps(
        {
            "driver": "raw",
            "file": {
                "driver": "nbd",
                "server": {"type": "inet", "host": "127.0.0.1", "port": str(port)},
                "export": "",
                "tls-creds": "tls0",
            },
        }
    )
    info = qemu_img("info", "--output=json", *objects, image)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["virtual-size"] == SIZE
    assert_identical(images["raw"], image, objects=objects)

    # A client without TLS is turned away, and so is one without a
    # certificate, or with one the CA did not sign.
    plain = qemu_img("info", f"nbd://127.0.0.1:{port}/")
    assert plain.returncode == 1
    assert "TLS negotiation required" in plain.stderr
    for who in ("anonymous", "stranger"):
        refused = qemu_img("info", *client(pki[who]), image)
        assert refused.returncode == 1, who
        assert "TLS" in refused.stderr or "certificate" in refused.stderr, refused.stderr

    # Dropping TLS is a change of settings: the export restarts without it.
    args.pop("tls_certs")
    plain_export = run(ansible, **args)
    assert plain_export["changed"] is True
    assert plain_export["url"] == f"nbd://127.0.0.1:{port}/"
    assert_identical(images["raw"], plain_export["url"])
    assert run(ansible, state="absent", port=port)["changed"] is True


def test_check_mode_changes_nothing(ansible, images):
    port = free_port()
    endpoint = ("tcp", "127.0.0.1", port)
    args = {"image": images["qcow2"], "port": port}

    planned = run(ansible, check=True, **args)
    assert planned["changed"] is True
    assert planned["pid"] is None
    assert planned["url"] == f"nbd://127.0.0.1:{port}/"
    assert planned["format"] == "qcow2"
    assert _qemu_nbd.find_export(endpoint) is None

    export = run(ansible, **args)
    assert export["command"] == planned["command"]
    assert run(ansible, check=True, **args)["changed"] is False

    different = run(ansible, check=True, readonly=False, **args)
    assert different["changed"] is True
    assert different["stopped_pid"] == export["pid"]
    running = _qemu_nbd.find_export(endpoint)
    assert (running.pid, running.argv) == (export["pid"], export["command"])

    absent = run(ansible, check=True, state="absent", port=port)
    assert absent["changed"] is True
    assert _qemu_nbd.find_export(endpoint).pid == export["pid"]

    assert run(ansible, state="absent", port=port)["changed"] is True
    assert _qemu_nbd.find_export(endpoint) is None


@pytest.fixture
def truncated(tmp_path, images):
    path = tmp_path / "truncated.qcow2"
    with open(images["qcow2"], "rb") as f:
        path.write_bytes(f.read(256 * 1024))
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "cannot read image '{tmp}/missing.qcow2': no such file"),
        ("directory", "cannot read image '{tmp}': it is a directory"),
        ("truncated", "image '{tmp}/truncated.qcow2' is corrupt: qemu-img check found"),
        ("relative", "image must be an absolute path or an NBD URL, not 'disk.qcow2'"),
        ("wrong format", "Image is not in qcow2 format"),
        ("nothing listening", "Connection refused"),
    ],
)
def test_bad_image(ansible, tmp_path, images, truncated, case, message):
    port = free_port()
    image = {
        "missing": str(tmp_path / "missing.qcow2"),
        "directory": str(tmp_path),
        "truncated": truncated,
        "relative": "disk.qcow2",
        "wrong format": images["raw"],
        "nothing listening": f"nbd://127.0.0.1:{free_port()}/",
    }[case]
    args = {"image": image, "port": port}
    if case == "wrong format":
        args["format"] = "qcow2"
    for check in (True, False):
        result = run(ansible, check=check, **args)
        assert result["failed"] is True
        assert message.format(tmp=tmp_path) in result["msg"]
        assert _qemu_nbd.find_export(("tcp", "127.0.0.1", port)) is None


def test_bad_endpoint(ansible, images, tmp_path):
    taken = tmp_path / "file"
    taken.write_text("precious")
    cases = [
        (
            {"socket": str(taken)},
            f"refusing to replace '{taken}': it exists and is not a socket",
        ),
        ({"socket": "rel.sock"}, "socket must be an absolute path, not 'rel.sock'"),
        ({"socket": str(tmp_path / "s.sock"), "port": 10809}, "mutually exclusive: socket|port"),
        ({"port": 70000}, "port must be between 1 and 65535, not 70000"),
        ({"tls_certs": str(tmp_path)}, "lacks ca-cert.pem, server-cert.pem, server-key.pem"),
    ]
    for extra, message in cases:
        result = run(ansible, image=images["qcow2"], **extra)
        assert result["failed"] is True, extra
        assert message in result["msg"]
    assert taken.read_text() == "precious"
    assert not (tmp_path / "s.sock").exists()


def test_failed_restart_is_reported(ansible, images, tmp_path):
    # New settings that fail only when qemu-nbd starts (certificates it
    # cannot load): the old export is gone by then, and the message says so.
    sock = str(tmp_path / "disk.sock")
    old = run(ansible, image=images["raw"], socket=sock)
    certs = tmp_path / "bad-certs"
    certs.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        (certs / name).write_text("not a certificate\n")
    result = run(ansible, image=images["raw"], socket=sock, tls_certs=str(certs))
    assert result["failed"] is True
    assert f"cannot export image '{images['raw']}': qemu-nbd: " in result["msg"]
    assert f"(the export it replaces, pid {old['pid']}, was stopped)" in result["msg"]
    assert old["pid"] not in live_pids()
    assert _qemu_nbd.find_export(("unix", sock)) is None
    assert not os.path.exists(sock)


def test_bad_new_image_keeps_running_export(ansible, images, tmp_path, truncated):
    sock = str(tmp_path / "disk.sock")
    old = run(ansible, image=images["qcow2"], socket=sock)
    result = run(ansible, image=truncated, socket=sock)
    assert result["failed"] is True
    assert "is corrupt" in result["msg"]
    assert _qemu_nbd.find_export(("unix", sock)).pid == old["pid"]
    assert_identical(images["raw"], old["url"])
    assert run(ansible, state="absent", socket=sock)["changed"] is True
