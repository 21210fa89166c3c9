# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The REST resources under /ovirt-engine/api: routing, parameters, replies.

Status codes are those the SDK expects (OVIRT-FACTS §1.4): GET 200, POST to a
collection 201, PUT 200, DELETE 200 with ``<action>`` (a 204 would make the
SDK fail), actions 200 with ``<action>``; a failed action answers its error
status with the fault inside ``<action>``.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from lab.engine import errors, search, vms, xml
from lab.engine.inventory import HOST_FIELDS

# The engine's sub-collection names, matched as whole path segments.
ID = r"(?P<id>[^/]+)"
SUB = r"(?P<sub>[^/]+)"
VERBS = "finalize|cancel|pause|resume|extend"
VM_VERBS = "start|stop|shutdown|reboot"
# VM sub-collections the lab answers as empty lists, by rel.
EMPTY_VM_LINKS = "|".join(sorted(set(xml.VM_LINKS) - {"diskattachments"}))


class Reply:
    def __init__(self, status: int, body: bytes = b"", content_type: str | None = None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers: dict[str, str] = {}


def xml_reply(status: int, element: ET.Element) -> Reply:
    return Reply(status, xml.render(element), "application/xml")


def error_reply(error: errors.ApiError, in_action: bool = False) -> Reply:
    if error.bare:
        return Reply(error.status)
    fault = xml.fault(error.reason, error.detail)
    if in_action:
        return xml_reply(error.status, xml.action("failed", failure=fault))
    return xml_reply(error.status, fault)


class Request:
    def __init__(self, method: str, path: str, query: dict[str, str], body: bytes):
        self.method = method
        self.path = path
        self.query = query
        self.body = body
        self.match: re.Match | None = None

    def param(self, name: str) -> str:
        assert self.match is not None
        return self.match.group(name)

    @property
    def search(self) -> str | None:
        return self.query.get("search")

    @property
    def case_sensitive(self) -> bool:
        return _boolean(self.query.get("case_sensitive"), default=True)

    @property
    def max(self) -> int | None:
        value = self.query.get("max")
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise errors.bad_request(f"Invalid max '{value}': expected an integer") from None

    @property
    def correlation_id(self) -> str | None:
        return self.query.get("correlation_id") or None


class Api:
    def __init__(self, engine):
        self.engine = engine
        self.routes = [
            ("GET", "", self.root),
            ("GET", "datacenters", self.list_data_centers),
            ("GET", f"datacenters/{ID}", self.get_data_center),
            ("GET", f"datacenters/{ID}/storagedomains", self.list_attached_domains),
            ("GET", f"datacenters/{ID}/storagedomains/{SUB}", self.get_attached_domain),
            ("GET", f"datacenters/{ID}/clusters", self.list_dc_clusters),
            ("GET", "clusters", self.list_clusters),
            ("GET", f"clusters/{ID}", self.get_cluster),
            ("GET", "hosts", self.list_hosts),
            ("GET", f"hosts/{ID}", self.get_host),
            ("GET", "storagedomains", self.list_storage_domains),
            ("GET", f"storagedomains/{ID}", self.get_storage_domain),
            ("GET", f"storagedomains/{ID}/disks", self.list_domain_disks),
            ("GET", f"storagedomains/{ID}/disks/{SUB}", self.get_domain_disk),
            ("GET", f"storagedomains/{ID}/disksnapshots", self.list_domain_snapshots),
            ("GET", "disks", self.list_disks),
            ("POST", "disks", self.add_disk),
            ("GET", f"disks/{ID}", self.get_disk),
            ("PUT", f"disks/{ID}", self.update_disk),
            ("DELETE", f"disks/{ID}", self.remove_disk),
            ("POST", f"disks/{ID}/(?P<verb>move)", self.move_disk),
            ("POST", f"vms/{ID}/disks/{SUB}/(?P<verb>move)", self.move_vm_disk),
            ("GET", f"disks/{ID}/disksnapshots", self.list_disk_snapshots),
            ("GET", f"disks/{ID}/disksnapshots/{SUB}", self.get_disk_snapshot),
            ("GET", "imagetransfers", self.list_transfers),
            ("POST", "imagetransfers", self.add_transfer),
            ("GET", f"imagetransfers/{ID}", self.get_transfer),
            ("POST", f"imagetransfers/{ID}/(?P<verb>{VERBS})", self.transfer_action),
            ("GET", "templates", self.list_templates),
            ("GET", f"templates/{ID}", self.get_template),
            ("GET", "vms", self.list_vms),
            ("POST", "vms", self.add_vm),
            ("GET", f"vms/{ID}", self.get_vm),
            ("PUT", f"vms/{ID}", self.update_vm),
            ("DELETE", f"vms/{ID}", self.remove_vm),
            ("POST", f"vms/{ID}/(?P<verb>{VM_VERBS})", self.vm_action),
            ("GET", f"vms/{ID}/diskattachments", self.list_attachments),
            ("POST", f"vms/{ID}/diskattachments", self.add_attachment),
            ("GET", f"vms/{ID}/diskattachments/{SUB}", self.get_attachment),
            ("PUT", f"vms/{ID}/diskattachments/{SUB}", self.update_attachment),
            ("DELETE", f"vms/{ID}/diskattachments/{SUB}", self.remove_attachment),
            ("GET", f"vms/{ID}/(?P<rel>{EMPTY_VM_LINKS})", self.list_vm_empty),
            ("GET", f"diskprofiles/{ID}", self.get_disk_profile),
            ("GET", "jobs", self.list_jobs),
            ("GET", f"jobs/{ID}", self.get_job),
            ("GET", f"jobs/{ID}/steps", self.list_job_steps),
        ]
        self._compiled = [
            (method, re.compile(pattern + r"/?\Z"), handler)
            for method, pattern, handler in self.routes
        ]

    def dispatch(self, request: Request) -> Reply:
        """Answer a request whose path is relative to the API root."""
        allowed = False
        for method, pattern, handler in self._compiled:
            match = pattern.match(request.path)
            if match is None:
                continue
            allowed = True
            if method != request.method:
                continue
            request.match = match
            in_action = request.method == "POST" and "verb" in pattern.groupindex
            try:
                return handler(request)
            except errors.ApiError as e:
                return error_reply(e, in_action)
        if allowed:
            return Reply(errors.METHOD_NOT_ALLOWED)
        return Reply(errors.NOT_FOUND)

    # API root.

    def root(self, request: Request) -> Reply:
        engine = self.engine
        summary = engine.inventory.summary()
        disks = engine.db.one("SELECT COUNT(*) AS n FROM disks")["n"]
        summary["disks"] = (disks, None)
        return xml_reply(200, xml.api(summary, engine.user, engine.instance_id))

    # Data centers and clusters.

    def list_data_centers(self, request: Request) -> Reply:
        inventory = self.engine.inventory
        items = self._select(
            request, inventory.data_centers(), inventory.data_center_fields(), "datacenters"
        )
        return xml_reply(200, xml.collection("data_centers", [xml.data_center(d) for d in items]))

    def get_data_center(self, request: Request) -> Reply:
        return xml_reply(
            200, xml.data_center(self.engine.inventory.data_center(request.param("id")))
        )

    def list_attached_domains(self, request: Request) -> Reply:
        inventory = self.engine.inventory
        dc = inventory.data_center(request.param("id"))
        items = [
            inventory.render_storage_domain(sd, dc["id"])
            for sd in inventory.storage_domains(dc["id"])
        ]
        return xml_reply(200, xml.collection("storage_domains", items))

    def get_attached_domain(self, request: Request) -> Reply:
        inventory = self.engine.inventory
        dc = inventory.data_center(request.param("id"))
        sd = inventory.storage_domain(request.param("sub"))
        if sd["data_center_id"] != dc["id"]:
            raise errors.not_found()
        return xml_reply(200, inventory.render_storage_domain(sd, dc["id"]))

    def list_dc_clusters(self, request: Request) -> Reply:
        inventory = self.engine.inventory
        dc = inventory.data_center(request.param("id"))
        items = [xml.cluster(c) for c in inventory.clusters(dc["id"])]
        return xml_reply(200, xml.collection("clusters", items))

    def list_clusters(self, request: Request) -> Reply:
        inventory = self.engine.inventory
        items = self._select(request, inventory.clusters(), inventory.cluster_fields(), "clusters")
        return xml_reply(200, xml.collection("clusters", [xml.cluster(c) for c in items]))

    def get_cluster(self, request: Request) -> Reply:
        return xml_reply(200, xml.cluster(self.engine.inventory.cluster(request.param("id"))))

    # Hosts.

    def list_hosts(self, request: Request) -> Reply:
        items = self._select(request, self.engine.inventory.hosts(), HOST_FIELDS, "hosts")
        return xml_reply(200, xml.collection("hosts", [xml.host(h) for h in items]))

    def get_host(self, request: Request) -> Reply:
        return xml_reply(200, xml.host(self.engine.inventory.host_row(request.param("id"))))

    # Storage domains.

    def list_storage_domains(self, request: Request) -> Reply:
        inventory = self.engine.inventory
        items = self._select(
            request,
            inventory.storage_domains(),
            inventory.storage_domain_fields(),
            "storagedomains",
        )
        rendered = [inventory.render_storage_domain(sd) for sd in items]
        return xml_reply(200, xml.collection("storage_domains", rendered))

    def get_storage_domain(self, request: Request) -> Reply:
        inventory = self.engine.inventory
        sd = inventory.storage_domain(request.param("id"))
        return xml_reply(200, inventory.render_storage_domain(sd))

    def list_domain_disks(self, request: Request) -> Reply:
        sd = self.engine.inventory.storage_domain(request.param("id"))
        disks = self.engine.disks
        items = disks.list(request.search, request.case_sensitive, request.max, sd["id"])
        return xml_reply(200, xml.collection("disks", [disks.render(d) for d in items]))

    def get_domain_disk(self, request: Request) -> Reply:
        sd = self.engine.inventory.storage_domain(request.param("id"))
        disk = self.engine.disks.get(request.param("sub"))
        if disk["storage_domain_id"] != sd["id"]:
            raise errors.not_found()
        return xml_reply(200, self.engine.disks.render(disk))

    def list_domain_snapshots(self, request: Request) -> Reply:
        sd = self.engine.inventory.storage_domain(request.param("id"))
        disks = self.engine.disks
        parent = xml.href("storagedomains", sd["id"], "disksnapshots")
        items = disks.snapshots(None, sd["id"], _include_active(request))
        rendered = [disks.render_snapshot(d, parent) for d in items]
        return xml_reply(200, xml.collection("disk_snapshots", rendered))

    # Disks.

    def list_disks(self, request: Request) -> Reply:
        disks = self.engine.disks
        items = disks.list(request.search, request.case_sensitive, request.max)
        return xml_reply(200, xml.collection("disks", [disks.render(d) for d in items]))

    def add_disk(self, request: Request) -> Reply:
        node = xml.parse(request.body, "disk")
        disks = self.engine.disks
        disk = disks.add(node, request.correlation_id)
        reply = xml_reply(201, disks.render(disk))
        reply.headers["Location"] = xml.href("disks", disk["id"])
        return reply

    def get_disk(self, request: Request) -> Reply:
        disks = self.engine.disks
        return xml_reply(200, disks.render(disks.get(request.param("id"))))

    def update_disk(self, request: Request) -> Reply:
        node = xml.parse(request.body, "disk")
        disks = self.engine.disks
        disk = disks.update(request.param("id"), node, request.correlation_id)
        return xml_reply(200, disks.render(disk))

    def remove_disk(self, request: Request) -> Reply:
        job_id = self.engine.disks.remove(request.param("id"), request.correlation_id)
        return xml_reply(200, xml.action("complete", job_id))

    def move_disk(self, request: Request) -> Reply:
        node = xml.parse(request.body, "action")
        job_id = self.engine.moves.move(request.param("id"), node, request.correlation_id)
        return xml_reply(200, xml.action("complete", job_id))

    def move_vm_disk(self, request: Request) -> Reply:
        self.engine.vms.attachment(request.param("id"), request.param("sub"))
        node = xml.parse(request.body, "action")
        job_id = self.engine.moves.move(request.param("sub"), node, request.correlation_id)
        return xml_reply(200, xml.action("complete", job_id))

    def list_disk_snapshots(self, request: Request) -> Reply:
        disks = self.engine.disks
        disk_id = request.param("id")
        parent = xml.href("disks", disk_id, "disksnapshots")
        items = disks.snapshots(disk_id, None, _include_active(request))
        rendered = [disks.render_snapshot(d, parent) for d in items]
        return xml_reply(200, xml.collection("disk_snapshots", rendered))

    def get_disk_snapshot(self, request: Request) -> Reply:
        disks = self.engine.disks
        disk = disks.get(request.param("id"))
        if disk["image_id"] != request.param("sub"):
            raise errors.not_found()
        parent = xml.href("disks", disk["id"], "disksnapshots")
        return xml_reply(200, disks.render_snapshot(disk, parent))

    # Image transfers.

    def list_transfers(self, request: Request) -> Reply:
        transfers = self.engine.transfers
        items = [transfers.render(t) for t in transfers.list()]
        return xml_reply(200, xml.collection("image_transfers", items))

    def add_transfer(self, request: Request) -> Reply:
        node = xml.parse(request.body, "image_transfer")
        transfers = self.engine.transfers
        transfer = transfers.add(node, request.correlation_id)
        reply = xml_reply(201, transfers.render(transfer))
        reply.headers["Location"] = xml.href("imagetransfers", transfer["id"])
        return reply

    def get_transfer(self, request: Request) -> Reply:
        transfers = self.engine.transfers
        return xml_reply(200, transfers.render(transfers.get(request.param("id"))))

    def transfer_action(self, request: Request) -> Reply:
        if request.body.strip():
            xml.parse(request.body, "action")
        self.engine.transfers.act(request.param("id"), request.param("verb"))
        return xml_reply(200, xml.action("complete"))

    # Templates and VMs.

    def list_templates(self, request: Request) -> Reply:
        names = [dc["name"] for dc in self.engine.inventory.data_centers()]
        items = self._select(request, vms.templates(), vms.template_fields(names), "templates")
        return xml_reply(200, xml.collection("templates", [xml.template(t) for t in items]))

    def get_template(self, request: Request) -> Reply:
        for template in vms.templates():
            if template["id"] == request.param("id"):
                return xml_reply(200, xml.template(template))
        raise errors.not_found()

    def list_vms(self, request: Request) -> Reply:
        service = self.engine.vms
        items = service.list(request.search, request.case_sensitive, request.max)
        return xml_reply(200, xml.collection("vms", [service.render(v) for v in items]))

    def add_vm(self, request: Request) -> Reply:
        service = self.engine.vms
        vm = service.add(xml.parse(request.body, "vm"), request.correlation_id)
        reply = xml_reply(201, service.render(vm))
        reply.headers["Location"] = xml.href("vms", vm["id"])
        return reply

    def get_vm(self, request: Request) -> Reply:
        service = self.engine.vms
        return xml_reply(200, service.render(service.get(request.param("id"))))

    def update_vm(self, request: Request) -> Reply:
        service = self.engine.vms
        node = xml.parse(request.body, "vm")
        vm = service.update(request.param("id"), node, request.correlation_id)
        return xml_reply(200, service.render(vm))

    def remove_vm(self, request: Request) -> Reply:
        detach_only = _boolean(request.query.get("detach_only"), default=False)
        job_id = self.engine.vms.remove(request.param("id"), detach_only, request.correlation_id)
        return xml_reply(200, xml.action("complete", job_id))

    def vm_action(self, request: Request) -> Reply:
        if request.body.strip():
            xml.parse(request.body, "action")
        service = self.engine.vms
        job_id = getattr(service, request.param("verb"))(
            request.param("id"), request.correlation_id
        )
        reply = xml.action("complete", job_id)
        xml.ref(reply, "vm", "vms", request.param("id"))
        return xml_reply(200, reply)

    def list_attachments(self, request: Request) -> Reply:
        service = self.engine.vms
        service.get(request.param("id"))
        items = [service.render_attachment(a) for a in service.attachments(request.param("id"))]
        return xml_reply(200, xml.collection("disk_attachments", items))

    def add_attachment(self, request: Request) -> Reply:
        service = self.engine.vms
        node = xml.parse(request.body, "disk_attachment")
        attachment = service.attach(request.param("id"), node, request.correlation_id)
        reply = xml_reply(201, service.render_attachment(attachment))
        reply.headers["Location"] = xml.href(
            "vms", attachment["vm_id"], "diskattachments", attachment["disk_id"]
        )
        return reply

    def get_attachment(self, request: Request) -> Reply:
        service = self.engine.vms
        attachment = service.attachment(request.param("id"), request.param("sub"))
        return xml_reply(200, service.render_attachment(attachment))

    def update_attachment(self, request: Request) -> Reply:
        service = self.engine.vms
        node = xml.parse(request.body, "disk_attachment")
        attachment = service.update_attachment(request.param("id"), request.param("sub"), node)
        return xml_reply(200, service.render_attachment(attachment))

    def remove_attachment(self, request: Request) -> Reply:
        detach_only = _boolean(request.query.get("detach_only"), default=True)
        self.engine.vms.detach(
            request.param("id"), request.param("sub"), detach_only, request.correlation_id
        )
        return xml_reply(200, xml.action("complete"))

    def list_vm_empty(self, request: Request) -> Reply:
        self.engine.vms.get(request.param("id"))
        return xml_reply(200, ET.Element(xml.VM_LINKS[request.param("rel")]))

    def get_disk_profile(self, request: Request) -> Reply:
        inventory = self.engine.inventory
        for sd in inventory.storage_domains():
            if xml.disk_profile_id(sd["id"]) == request.param("id"):
                return xml_reply(200, xml.disk_profile(sd))
        raise errors.not_found()

    # Jobs.

    def list_jobs(self, request: Request) -> Reply:
        jobs = self.engine.jobs.list(request.search, request.case_sensitive, request.max)
        return xml_reply(200, xml.collection("jobs", [xml.job(j) for j in jobs]))

    def get_job(self, request: Request) -> Reply:
        return xml_reply(200, xml.job(self.engine.jobs.get(request.param("id"))))

    def list_job_steps(self, request: Request) -> Reply:
        jobs = self.engine.jobs
        jobs.get(request.param("id"))
        items = [xml.step(st) for st in jobs.steps(request.param("id"))]
        return xml_reply(200, xml.collection("steps", items))

    # Private helpers.

    def _select(self, request: Request, items, fields, collection) -> list:
        return search.select(
            items, request.search, fields, collection, request.case_sensitive, request.max
        )


def _boolean(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    lowered = value.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise errors.bad_request(f"Invalid boolean '{value}': expected true or false")


def _include_active(request: Request) -> bool:
    return _boolean(request.query.get("include_active"), default=False)
