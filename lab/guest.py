# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lab's guest: a small bootable disk image made from Debian packages.

    python -m lab guest-image PATH [--size BYTES] [--format raw|qcow2]

The packages are fetched with ``apt-get download`` and unpacked with ``dpkg
-x``; nothing is installed, mounted or attached to a loop device. The image:

- an MBR with one Linux partition at 1 MiB, holding an ext4 file system made
  from a directory with ``mke2fs -d`` (kernel and initramfs under /boot);
- GRUB for BIOS: ``boot.img`` in the first 440 bytes, ``core.img`` (with an
  embedded configuration that boots the kernel) from sector 1 on;
- an initramfs whose only program is static busybox. Its init loads the
  virtio and SCSI modules, mounts the partition, answers a guest agent's
  ``guest-ping`` on the ``org.qemu.guest_agent.0`` port, prints
  :data:`READY` on the serial console, then appends the next sequence number
  to ``/seq.log`` :data:`WRITES_PER_SECOND` times a second (the file system
  is mounted ``sync``: each write is on the disk when it returns), until the
  ACPI power button is pressed: then it stops writing, unmounts and powers
  off.

The ``.deb`` files are kept in a cache directory, so later builds need no
download.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import re
import shutil
import struct
import subprocess
import tempfile

READY = "thinair-guest ready"
POWERING_OFF = "thinair-guest powering off"
SEQUENCE_FILE = "/seq.log"
# Under TCG the idle guest takes about 3 % of a core writing four times a
# second (0.5 % not writing), where a sync and a usleep process a write took
# about 7 %.
WRITES_PER_SECOND = 4
LABEL = "thinair-guest"

# Debian's kernel for virtual machines: LZ4-compressed, started with GRUB's
# linux it booted in about 5 s under TCG where the generic XZ-compressed
# kernel took about 8.5 s.
KERNEL_PACKAGE = "linux-image-cloud-amd64"
PACKAGES = ("busybox-static", "grub-pc-bin", "grub-common")
# Loaded in dependency order (each module's "depends=" names the others),
# those built into the kernel skipped; crc32c is what ext4's metadata
# checksums need, though not listed there.
MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "crc32c_generic",
    "ext4",
    "virtio_console",
    "button",
    "evdev",
)

SECTOR = 512
PARTITION_START = 2048 * SECTOR
FILE_SYSTEM_SIZE = 32 * 1024**2
# Where boot.img keeps the partition table: it may only fill what is before.
MBR_CODE_SIZE = 440
MBR_SIGNATURE = b"\x55\xaa"
LINUX_PARTITION = 0x83
BOOTABLE = 0x80
# GRUB 2.06 cannot read ext4 with metadata_csum_seed; later e2fsprogs may turn
# it on by default.
EXT4_FEATURES = "^metadata_csum_seed"
# GRUB starts the kernel with the 16-bit boot protocol (linux16): under TCG
# the guest prints READY about 3.7 s after qemu starts, about 6 s with the
# 32-bit one (linux).
GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "linux16", "boot")
KERNEL_ARGS = "console=ttyS0 quiet panic=-1"

DEFAULT_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "thinair-lab", "debs"
)

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko 2>/dev/null; done

root=
i=0
while [ -z "$root" ] && [ $i -lt 100 ]; do
    root=$(findfs LABEL=@LABEL@ 2>/dev/null)
    [ -n "$root" ] || usleep 100000
    i=$((i + 1))
done
if [ -z "$root" ] || ! mount -t ext4 -o sync $root /mnt; then
    echo "thinair-guest: no file system labelled @LABEL@"
    while :; do sleep 60; done
fi

button=
for e in /sys/class/input/event*; do
    [ "$(cat $e/device/name 2>/dev/null)" = "Power Button" ] && button=/dev/input/${e##*/}
done

# The agent's port shows up once the host side is announced, maybe later.
(
    i=0
    while [ $i -lt 300 ]; do
        for p in /sys/class/virtio-ports/*; do
            if [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
                exec 4<>/dev/${p##*/}
                while read -r request <&4; do echo '{"return": {}}' >&4; done
            fi
        done
        usleep 100000
        i=$((i + 1))
    done
) &

n=$(tail -n 1 /mnt@SEQ@ 2>/dev/null)
case "$n" in ''|*[!0-9]*) n=0 ;; esac
# The shell's own read waits out the pause: no process is started for a write.
mkfifo /pause
(
    while :; do
        n=$((n + 1))
        echo $n >> /mnt@SEQ@
        read -t @WRITE_PAUSE@ <> /pause
    done
) &
writer=$!
echo "@READY@ root=$root seq=$n"

if [ -n "$button" ]; then
    dd of=/dev/null bs=24 count=1 < $button 2>/dev/null
else
    while :; do sleep 60; done
fi
kill $writer
wait $writer
sync
umount /mnt
echo "@POWERING_OFF@"
poweroff -f
while :; do sleep 60; done
"""


class GuestError(Exception):
    """The guest image cannot be built; the message says why."""


def build(path: str, size: int | None = None, fmt: str = "raw", cache: str = DEFAULT_CACHE):
    """Build the guest image at path: raw or qcow2, of virtual size (bytes,
    at least the file system's end; default: just that)."""
    if fmt not in ("raw", "qcow2"):
        raise GuestError(f"Invalid format {fmt!r}: use raw or qcow2")
    minimum = PARTITION_START + FILE_SYSTEM_SIZE
    size = minimum if size is None else size
    if size < minimum:
        raise GuestError(f"Invalid size {size}: the guest needs at least {minimum} bytes")
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise GuestError(f"Directory {directory} does not exist: create it first")
    debs = _fetch(cache)
    with tempfile.TemporaryDirectory(prefix="lab-guest-") as work:
        root = os.path.join(work, "unpacked")
        for deb in debs:
            _run(["dpkg", "-x", deb, root])
        tree = os.path.join(work, "tree")
        os.makedirs(os.path.join(tree, "boot", "grub"))
        kernel = _one(os.path.join(root, "boot", "vmlinuz-*"), "kernel")
        shutil.copy(kernel, os.path.join(tree, "boot", "vmlinuz"))
        with open(os.path.join(tree, "boot", "initrd.img"), "wb") as f:
            f.write(_initramfs(root))
        raw = os.path.join(work, "disk.raw")
        with open(raw, "wb") as f:
            f.truncate(size)
        _run(
            [
                "mke2fs", "-q", "-F", "-t", "ext4", "-O", EXT4_FEATURES, "-L", LABEL,
                "-d", tree, "-E", f"offset={PARTITION_START},root_owner=0:0",
                raw, f"{FILE_SYSTEM_SIZE // 1024}k",
            ]
        )  # fmt: skip
        _install_grub(root, work, raw)
        if fmt == "raw":
            shutil.move(raw, path)
        else:
            _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path])
    return {"path": path, "format": fmt, "size": size}


# Private helpers.


def _fetch(cache: str) -> list[str]:
    """The .deb files of the guest, downloaded into cache when missing."""
    os.makedirs(cache, exist_ok=True)
    try:
        return _download(cache)
    except GuestError:
        if os.geteuid() != 0:
            raise
    # Package lists missing or older than the archive: refresh them once.
    _run(["apt-get", "update", "-q"])
    return _download(cache)


def _download(cache: str) -> list[str]:
    wanted = (_kernel_package(), *PACKAGES)
    missing = [p for p in wanted if not _cached(cache, p)]
    if missing:
        proc = subprocess.run(
            ["apt-get", "download", *missing],
            cwd=cache,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise GuestError(
                f"apt-get download {' '.join(missing)} failed: {proc.stderr.strip()} "
                "(run `apt-get update` first if the package lists are missing)"
            )
    return [_cached(cache, p) for p in wanted]


def _kernel_package() -> str:
    # linux-image-amd64 only depends on the versioned package that holds the kernel.
    proc = subprocess.run(
        ["apt-cache", "depends", KERNEL_PACKAGE], capture_output=True, text=True, check=False
    )
    found = re.findall(r"Depends: (linux-image-\d\S*)", proc.stdout)
    if not found:
        raise GuestError(
            f"Cannot find the kernel package behind {KERNEL_PACKAGE}: run `apt-get update`"
        )
    return found[0]


def _cached(cache: str, package: str) -> str | None:
    found = sorted(glob.glob(os.path.join(cache, f"{package}_*.deb")))
    return found[-1] if found else None


def _initramfs(root: str) -> bytes:
    modules = _module_order(root)
    init = (
        INIT.replace("@LABEL@", LABEL)
        .replace("@SEQ@", SEQUENCE_FILE)
        .replace("@WRITE_PAUSE@", f"{1 / WRITES_PER_SECOND:.3f}")
        .replace("@READY@", READY)
        .replace("@POWERING_OFF@", POWERING_OFF)
    )
    archive = _Cpio()
    for directory in ("bin", "dev", "modules"):
        archive.directory(directory)
    archive.device("dev/console", 0o600, 5, 1)
    archive.file("init", init.encode(), 0o755)
    with open(os.path.join(root, "bin", "busybox"), "rb") as f:
        archive.file("bin/busybox", f.read(), 0o755)
    for name, path in modules:
        with open(path, "rb") as f:
            archive.file(f"modules/{name}.ko", f.read(), 0o644)
    archive.file("modules/order", "\n".join(n for n, _ in modules).encode() + b"\n", 0o644)
    return gzip.compress(archive.close(), compresslevel=6, mtime=0)


def _module_order(root: str) -> list[tuple[str, str]]:
    """(name, path) of MODULES and their dependencies, dependencies first."""
    files = {}
    pattern = os.path.join(root, "lib", "modules", "*", "kernel", "**", "*.ko")
    for path in glob.glob(pattern, recursive=True):
        files[_module_name(path)] = path
    builtin = set()
    for listing in glob.glob(os.path.join(root, "lib", "modules", "*", "modules.builtin")):
        with open(listing) as f:
            builtin.update(_module_name(line.strip()) for line in f if line.strip())
    order: list[tuple[str, str]] = []

    def visit(name, chain):
        key = _module_name(name)
        if key in builtin or any(key == n for n, _ in order):
            return
        if key in chain:
            raise GuestError(f"Kernel module dependency loop: {' -> '.join((*chain, key))}")
        path = files.get(key)
        if path is None:
            raise GuestError(f"Kernel module {name} is not in the kernel package")
        for dependency in _depends(path):
            visit(dependency, (*chain, key))
        order.append((key, path))

    for name in MODULES:
        visit(name, ())
    return order


def _module_name(path: str) -> str:
    """The name the kernel knows a module by, from its file name or path."""
    return os.path.basename(path).removesuffix(".ko").replace("-", "_")


def _depends(path: str) -> list[str]:
    with open(path, "rb") as f:
        found = re.search(rb"depends=([^\0]*)\0", f.read())
    if found is None or not found.group(1):
        return []
    return found.group(1).decode().split(",")


def _install_grub(root: str, work: str, raw: str) -> None:
    modules_dir = os.path.join(root, "usr", "lib", "grub", "i386-pc")
    config = os.path.join(work, "early.cfg")
    with open(config, "w") as f:
        f.write(
            "set root=(hd0,msdos1)\n"
            f"linux16 /boot/vmlinuz {KERNEL_ARGS}\n"
            "initrd16 /boot/initrd.img\n"
            "boot\n"
        )
    core = os.path.join(work, "core.img")
    _run(
        [
            os.path.join(root, "usr", "bin", "grub-mkimage"),
            "-O", "i386-pc", "-d", modules_dir, "-c", config,
            "-p", "(hd0,msdos1)/boot/grub", "-o", core, *GRUB_MODULES,
        ]
    )  # fmt: skip
    with open(os.path.join(modules_dir, "boot.img"), "rb") as f:
        boot = f.read()
    with open(core, "rb") as f:
        core_image = f.read()
    if SECTOR + len(core_image) > PARTITION_START:
        raise GuestError(f"GRUB's core.img ({len(core_image)} bytes) does not fit before 1 MiB")
    size = os.path.getsize(raw)
    sectors = (min(size, 2**32 * SECTOR) - PARTITION_START) // SECTOR
    # One partition entry: status, CHS start, type, CHS end, LBA start, sectors.
    # The CHS fields say "use LBA" as partitioning tools write them for
    # large disks.
    entry = struct.pack(
        "<B3sB3sII",
        BOOTABLE,
        b"\xfe\xff\xff",
        LINUX_PARTITION,
        b"\xfe\xff\xff",
        PARTITION_START // SECTOR,
        sectors,
    )
    with open(raw, "r+b") as f:
        f.write(boot[:MBR_CODE_SIZE])
        f.seek(446)
        f.write(entry + bytes(48) + MBR_SIGNATURE)
        f.seek(SECTOR)
        f.write(core_image)


class _Cpio:
    """A "newc" cpio archive, the format the kernel unpacks as initramfs."""

    def __init__(self):
        self._out = io.BytesIO()
        self._ino = 0

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755, b"")

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, 0o100000 | mode, data)

    def device(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, 0o020000 | mode, b"", rdev=(major, minor))

    def close(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", ino=0)
        return self._out.getvalue()

    def _entry(self, name, mode, data, rdev=(0, 0), ino=None):
        if ino is None:
            self._ino += 1
            ino = self._ino
        encoded = name.encode() + b"\0"
        nlink = 2 if mode & 0o040000 else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % v for v in fields)
        self._out.write(header + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self):
        self._out.write(bytes(-self._out.tell() % 4))


def _one(pattern: str, what: str) -> str:
    found = sorted(glob.glob(pattern))
    if not found:
        raise GuestError(f"No {what} found at {pattern}")
    return found[-1]


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise GuestError(f"{argv[0]} not found: install it") from None
    if proc.returncode != 0:
        raise GuestError(f"{os.path.basename(argv[0])} failed: {proc.stderr.strip()}")
