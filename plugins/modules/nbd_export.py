#!/usr/bin/python
# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nbd_export
short_description: Expose a disk image over NBD with qemu-nbd
version_added: 0.1.0
description:
  - Serves a local image, or another NBD export, with C(qemu-nbd) on the node
    the task runs on, and returns its NBD URL. oVirt hosts, C(qemu-img) and
    the other modules of this collection can read the disk from that URL.
  - The export runs in the background and outlives the task, until a task
    with I(state=absent) stops it. A reboot of the node ends it too.
  - Works on any image qemu reads (raw, qcow2, compressed qcow2, vmdk, vhdx,
    vdi, qed). The format is probed with C(qemu-img info) unless given, and
    qemu-nbd is always told it, so it never guesses. Images other than raw
    are checked with C(qemu-img check) before they are served, so a
    truncated or corrupt image fails instead of being served as zeros.
  - An export is identified by where it listens (I(socket), or I(address)
    and I(port)). A running export with the same settings is left alone; any
    other qemu-nbd server listening there is stopped and replaced.
  - Any file qemu does not recognise is served as raw, its size rounded up
    to whole 512-byte sectors.
options:
  image:
    description:
      - Absolute path of the image, or an NBD URL to re-export
        (C(nbd://host:port/export), C(nbd+unix:///export?socket=PATH),
        C(nbd:HOST:PORT[:exportname=NAME]), C(nbd:unix:PATH[:exportname=NAME])).
      - Required when I(state=present); ignored when I(state=absent).
    type: str
  state:
    description:
      - C(present) starts the export, or restarts it when its settings differ.
      - C(absent) stops whatever qemu-nbd server listens on the endpoint,
        waits until it has exited and removes its unix socket.
    type: str
    choices: [present, absent]
    default: present
  readonly:
    description:
      - Serve the image read-only. With C(false), clients write to the image;
        discard requests are passed down and zero writes become holes.
    type: bool
    default: true
  format:
    description:
      - Format of the image. Probed with C(qemu-img info) when not given.
      - Give it for raw images from untrusted sources, so that a raw image
        whose content looks like another format is still served as raw.
    type: str
    choices: [raw, qcow2, vmdk, vhdx, vdi, qed, vpc]
  address:
    description:
      - Address to listen on. C(0.0.0.0) or C(::) listens on every address;
        the returned URL then names the node by its fully qualified name.
      - Mutually exclusive with I(socket).
    type: str
    default: 127.0.0.1
  port:
    description:
      - TCP port to listen on.
      - Mutually exclusive with I(socket).
    type: int
    default: 10809
  socket:
    description:
      - Absolute path of a unix socket to listen on, instead of a TCP port.
      - The directory must exist. A stale socket file is replaced; any other
        file there is refused.
      - Mutually exclusive with I(address) and I(port).
    type: path
  export_name:
    description:
      - Name of the export; clients ask for it in the URL's path.
    type: str
    default: ""
  tls_certs:
    description:
      - Absolute path of a directory with the server files of qemu's
        C(tls-creds-x509) object, C(ca-cert.pem), C(server-cert.pem) and
        C(server-key.pem). The export then accepts only TLS clients, and the
        URL becomes C(nbds://) or C(nbds+unix://).
      - qemu verifies peers, so clients must present a certificate signed by
        that CA (C(client-cert.pem) and C(client-key.pem) on the client side).
      - On a unix socket, clients check the server certificate against the
        name C(localhost).
    type: path
  shared:
    description:
      - How many clients may be connected at once; C(0) means no limit.
    type: int
    default: 8
notes:
  - Needs C(qemu-nbd) and C(qemu-img) (package qemu-utils or qemu-img) on the
    node, and a Linux C(/proc), where running exports are found.
  - Supports check mode and diff mode. In check mode the image is still read
    to learn its format.
  - Writable exports lock the image; other processes cannot open it for
    writing while the export runs.
author:
  - thinair.ovirt contributors (@thinair)
"""

EXAMPLES = r"""
- name: Expose a VM disk to an oVirt host, read-only
  thinair.ovirt.nbd_export:
    image: /var/lib/libvirt/images/vm1-disk1.qcow2
    address: 0.0.0.0
    port: 10809
    export_name: vm1-disk1
  register: export

- name: Show the URL clients use
  ansible.builtin.debug:
    msg: "{{ export.url }}"

- name: Expose an image over TLS on a unix socket
  thinair.ovirt.nbd_export:
    image: /var/tmp/fedora-40.raw
    format: raw
    socket: /run/thinair/fedora.sock
    tls_certs: /etc/pki/qemu

- name: Stop the export
  thinair.ovirt.nbd_export:
    state: absent
    address: 0.0.0.0
    port: 10809
"""

RETURN = r"""
url:
  description: NBD URL of the export.
  returned: when I(state=present)
  type: str
  sample: nbd://127.0.0.1:10809/vm1-disk1
size:
  description:
    - Size in bytes of the export, as NBD clients see it; what a disk reading it needs at least.
    - C(null) in check mode when the export would be started, and for a TLS export.
  returned: when I(state=present)
  type: int
  sample: 21474836480
pid:
  description:
    - Process id of the qemu-nbd serving the export.
    - C(null) in check mode when the export would be started.
  returned: when I(state=present)
  type: int
  sample: 41382
format:
  description: Format of the image, as qemu-nbd opens it.
  returned: when I(state=present)
  type: str
  sample: qcow2
export_name:
  description: Name of the export.
  returned: when I(state=present)
  type: str
  sample: vm1-disk1
readonly:
  description: Whether the export refuses writes.
  returned: when I(state=present)
  type: bool
  sample: true
image:
  description: The image served, as qemu-nbd opens it (local paths made absolute).
  returned: when I(state=present)
  type: str
  sample: /var/lib/libvirt/images/vm1-disk1.qcow2
command:
  description: Command line of the qemu-nbd serving the export; it identifies the export.
  returned: when I(state=present)
  type: list
  elements: str
  sample: ["qemu-nbd", "--fork", "--persistent", "--shared=8", "--export-name=vm1-disk1",
           "--bind=127.0.0.1", "--port=10809", "--read-only", "--cache=writeback", "--aio=threads",
           "--allocation-depth", "--format=qcow2", "/var/lib/libvirt/images/vm1-disk1.qcow2"]
stopped_pid:
  description: Process id of the qemu-nbd that was stopped (or would be, in check mode).
  returned: when an export was stopped or replaced
  type: int
  sample: 41213
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.thinair.ovirt.plugins.module_utils import (
    _nbd,
    _nbd_wire,
    _qemu_img,
    _qemu_nbd,
)


class NbdExport:
    """Bring the qemu-nbd server on one endpoint to the state the task asks for."""

    def __init__(self, module):
        self.module = module
        self.params = module.params
        if self.params["socket"] is not None:
            self.endpoint = ("unix", os.path.normpath(self.params["socket"]))
        else:
            self.endpoint = ("tcp", self.params["address"], self.params["port"])

    def present(self):
        params = self.params
        argv = _qemu_nbd.export_command(
            params["image"],
            fmt=params["format"],
            readonly=params["readonly"],
            address=params["address"],
            port=params["port"],
            socket=params["socket"],
            export_name=params["export_name"],
            tls_certs=params["tls_certs"],
            shared=params["shared"],
        )
        wanted = _qemu_nbd.Export(argv)
        running = _qemu_nbd.find_export(self.endpoint)
        if running is not None and running.argv == argv:
            return self._result(False, running)
        # Refuse a bad image before touching the running export. The image
        # it already serves may be locked by it, and is checked once it is
        # stopped.
        verified = running is None or running.image != wanted.image
        if verified:
            _qemu_nbd.verify(wanted)
        result = {}
        export = wanted
        if running is not None:
            result["stopped_pid"] = running.pid
        if not self.module.check_mode:
            if running is not None:
                _qemu_nbd.stop(running.pid)
            try:
                export = _qemu_nbd.start(argv, verify_image=not verified)
            except _qemu_img.QemuError as e:
                if running is not None:
                    raise _qemu_img.QemuError(
                        f"{e} (the export it replaces, pid {running.pid}, was stopped)"
                    ) from None
                raise
        result.update(self._result(True, export))
        result["diff"] = {"before": _describe(running), "after": _describe(export)}
        return result

    def absent(self):
        running = _qemu_nbd.find_export(self.endpoint)
        if running is None:
            return {"changed": False}
        if not self.module.check_mode:
            _qemu_nbd.stop(running.pid)
        return {
            "changed": True,
            "stopped_pid": running.pid,
            "diff": {"before": _describe(running), "after": {}},
        }

    def _result(self, changed, export):
        return {
            "changed": changed,
            "url": export.url,
            "size": _size(export),
            "pid": export.pid,
            "format": export.format,
            "export_name": export.export_name,
            "readonly": export.readonly,
            "image": export.image,
            "command": export.argv,
        }


def _size(export):
    """The export's size as its clients see it, read over NBD; None for an
    export that is not running (check mode) or that needs TLS."""
    if export.pid is None or export.tls:
        return None
    try:
        client = _nbd.Client(export.url, meta_contexts=())
    except _nbd.Error as e:
        raise _qemu_img.QemuError(
            f"the export at {export.url} runs but does not answer: {e}"
        ) from e
    try:
        return client.export_size
    finally:
        client.close()


def _describe(export):
    if export is None:
        return {}
    return {
        "url": export.url,
        "image": export.image,
        "format": export.format,
        "readonly": export.readonly,
        "command": " ".join(export.argv),
    }


def main():
    module = AnsibleModule(
        argument_spec={
            "image": {"type": "str"},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "readonly": {"type": "bool", "default": True},
            "format": {
                "type": "str",
                "choices": ["raw", "qcow2", "vmdk", "vhdx", "vdi", "qed", "vpc"],
            },
            "address": {"type": "str", "default": "127.0.0.1"},
            "port": {"type": "int", "default": _nbd_wire.NBD_DEFAULT_PORT},
            "socket": {"type": "path"},
            "export_name": {"type": "str", "default": ""},
            "tls_certs": {"type": "path"},
            "shared": {"type": "int", "default": 8},
        },
        required_if=[("state", "present", ["image"])],
        mutually_exclusive=[("socket", "address"), ("socket", "port")],
        supports_check_mode=True,
    )
    params = module.params
    image = params["image"]
    if params["state"] == "present" and not (_qemu_img.is_nbd_url(image) or os.path.isabs(image)):
        module.fail_json(msg=f"image must be an absolute path or an NBD URL, not '{image}'")
    if params["socket"] is not None and not os.path.isabs(params["socket"]):
        module.fail_json(msg=f"socket must be an absolute path, not '{params['socket']}'")

    export = NbdExport(module)
    try:
        result = export.present() if params["state"] == "present" else export.absent()
    except (_qemu_img.QemuError, ValueError) as e:
        module.fail_json(msg=str(e))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
