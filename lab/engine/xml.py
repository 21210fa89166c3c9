# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Entities to and from oVirt's XML.

Shapes follow ovirt-engine-api-model: ``id`` and ``href`` are attributes,
every other field is a child element named in snake_case, references to other
entities are empty elements with ``href`` and ``id``, sub-collections are
``<link rel=... href=...>``, and enum values are the lowercase model names
(the SDK silently reads any other spelling as None).
"""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

from lab.engine import errors

API = "/ovirt-engine/api"
PRODUCT_NAME = "oVirt Engine"
PRODUCT_VENDOR = "ovirt.org"
VERSION = (4, 5, 6, 0)  # major, minor, build, revision
COMPATIBILITY = (4, 7)  # cluster and data center level
XML_HEADER = b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'

# Top-level collections announced by the API root, in the engine's rel names;
# links and actions name only what the lab serves.
SEARCHABLE = (
    "clusters",
    "datacenters",
    "disks",
    "hosts",
    "jobs",
    "storagedomains",
    "templates",
    "vms",
)
ROOT_LINKS = (*SEARCHABLE, "imagetransfers")

TRANSFER_ACTIONS = ("cancel", "extend", "finalize", "pause", "resume")
VM_ACTIONS = ("reboot", "shutdown", "start", "stop")
# Sub-collections of a VM: the engine links them all; the lab serves
# diskattachments and answers the others as empty collections.
VM_LINKS = {
    "affinitylabels": "affinity_labels",
    "applications": "applications",
    "cdroms": "cdroms",
    "diskattachments": "disk_attachments",
    "graphicsconsoles": "graphics_consoles",
    "hostdevices": "host_devices",
    "katelloerrata": "katello_errata",
    "mediateddevices": "vm_mediated_devices",
    "nics": "nics",
    "numanodes": "vm_numa_nodes",
    "permissions": "permissions",
    "reporteddevices": "reported_devices",
    "sessions": "sessions",
    "snapshots": "snapshots",
    "statistics": "statistics",
    "tags": "tags",
    "watchdogs": "watchdogs",
}


def href(*parts: str) -> str:
    return "/".join((API, *parts))


# Reading request bodies.


class Node:
    """Read access to one element of a request body, with the engine's errors."""

    def __init__(self, element: ET.Element):
        self.element = element

    @property
    def tag(self) -> str:
        return self.element.tag

    @property
    def id(self) -> str | None:
        value = self.element.get("id")
        if value is None:
            value = self.text("id")
        return value or None

    def has(self, name: str) -> bool:
        return self.element.find(name) is not None

    def child(self, name: str) -> Node | None:
        found = self.element.find(name)
        return None if found is None else Node(found)

    def children(self, path: str) -> list[Node]:
        return [Node(e) for e in self.element.findall(path)]

    def text(self, name: str) -> str | None:
        found = self.element.find(name)
        if found is None or found.text is None:
            return None
        return found.text.strip()

    def integer(self, name: str) -> int | None:
        value = self.text(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise errors.bad_request(f"Value '{value}' of '{name}' is not an integer") from None

    def boolean(self, name: str) -> bool | None:
        value = self.text(name)
        if value is None or value == "":
            return None
        lowered = value.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise errors.bad_request(f"Value '{value}' of '{name}' is not a boolean")

    def enum(self, name: str, values: tuple[str, ...], enum_name: str) -> str | None:
        value = self.text(name)
        if value is None or value == "":
            return None
        if value.lower() not in values:
            raise errors.invalid_value(value, enum_name)
        return value.lower()


def parse(body: bytes, root: str) -> Node:
    """Parse a request body whose root element must be root."""
    if not body or not body.strip():
        raise errors.bad_request(f"Request body is empty: expected <{root}>")
    try:
        element = ET.fromstring(body)
    except ET.ParseError as e:
        raise errors.bad_request(f"Request syntactically incorrect: {e}") from None
    if element.tag != root:
        raise errors.bad_request(f"Unexpected element <{element.tag}>: expected <{root}>")
    return Node(element)


# Building replies.


def render(element: ET.Element) -> bytes:
    return XML_HEADER + ET.tostring(element, encoding="utf-8", xml_declaration=False)


def entity(tag: str, collection: str, entity_id: str, parent: ET.Element | None = None):
    attrs = {"href": href(collection, entity_id), "id": entity_id}
    if parent is None:
        return ET.Element(tag, attrs)
    return ET.SubElement(parent, tag, attrs)


def field(parent: ET.Element, tag: str, value) -> None:
    """Add a child holding value; None adds nothing, as the engine omits unset fields."""
    if value is None:
        return
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    ET.SubElement(parent, tag).text = text


def ref(parent: ET.Element, tag: str, collection: str | None, entity_id: str) -> ET.Element:
    """A reference to another entity; without a collection, a bare id."""
    attrs = {"id": entity_id}
    if collection is not None:
        attrs["href"] = href(collection, entity_id)
    return ET.SubElement(parent, tag, attrs)


def link(parent: ET.Element, rel: str, target: str) -> None:
    ET.SubElement(parent, "link", {"href": target, "rel": rel})


def actions(parent: ET.Element, base: str, verbs: tuple[str, ...]) -> None:
    holder = ET.SubElement(parent, "actions")
    for verb in verbs:
        link(holder, verb, f"{base}/{verb}")


def version(parent: ET.Element, tag: str, major: int, minor: int) -> None:
    holder = ET.SubElement(parent, tag)
    field(holder, "major", major)
    field(holder, "minor", minor)


def date(epoch: float | None) -> str | None:
    """The engine's date format: local time with milliseconds and offset."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).astimezone().isoformat(timespec="milliseconds")


def collection(tag: str, items: list[ET.Element]) -> ET.Element:
    root = ET.Element(tag)
    root.extend(items)
    return root


def fault(reason: str, detail: str | None) -> ET.Element:
    root = ET.Element("fault")
    field(root, "reason", reason)
    field(root, "detail", detail)
    return root


def action(status: str, job_id: str | None = None, failure: ET.Element | None = None):
    root = ET.Element("action")
    field(root, "status", status)
    if job_id is not None:
        ref(root, "job", "jobs", job_id)
    if failure is not None:
        root.append(failure)
    return root


# Entities. Each takes the plain dicts the services keep in the database.


def api(summary: dict, user: dict, instance_id: str) -> ET.Element:
    root = ET.Element("api")
    for rel in sorted(ROOT_LINKS):
        link(root, rel, href(rel))
        if rel in SEARCHABLE:
            link(root, f"{rel}/search", href(f"{rel}?search={{query}}"))
    info = ET.SubElement(root, "product_info")
    field(info, "instance_id", instance_id)
    field(info, "name", PRODUCT_NAME)
    field(info, "vendor", PRODUCT_VENDOR)
    ver = ET.SubElement(info, "version")
    major, minor, build, revision = VERSION
    field(ver, "build", build)
    field(ver, "full_version", f"{major}.{minor}.{build}-{revision}.lab")
    field(ver, "major", major)
    field(ver, "minor", minor)
    field(ver, "revision", revision)
    ET.SubElement(root, "special_objects")
    totals = ET.SubElement(root, "summary")
    for name, (total, active) in summary.items():
        part = ET.SubElement(totals, name)
        if active is not None:
            field(part, "active", active)
        field(part, "total", total)
    field(root, "time", date(time.time()))
    ref(root, "authenticated_user", "users", user["id"])
    ref(root, "effective_user", "users", user["id"])
    return root


def data_center(dc: dict) -> ET.Element:
    root = entity("data_center", "datacenters", dc["id"])
    field(root, "name", dc["name"])
    field(root, "description", dc["description"])
    for rel in ("clusters", "storagedomains"):
        link(root, rel, href("datacenters", dc["id"], rel))
    field(root, "local", False)
    field(root, "quota_mode", "disabled")
    field(root, "status", "up")
    field(root, "storage_format", "v5")
    supported = ET.SubElement(root, "supported_versions")
    version(supported, "version", *COMPATIBILITY)
    version(root, "version", *COMPATIBILITY)
    return root


def cluster(cl: dict) -> ET.Element:
    root = entity("cluster", "clusters", cl["id"])
    field(root, "name", cl["name"])
    field(root, "description", cl["description"])
    cpu = ET.SubElement(root, "cpu")
    field(cpu, "architecture", "x86_64")
    field(cpu, "type", "Intel Nehalem Family")
    version(root, "version", *COMPATIBILITY)
    ref(root, "data_center", "datacenters", cl["data_center_id"])
    return root


def host(h: dict) -> ET.Element:
    root = entity("host", "hosts", h["id"])
    field(root, "name", h["name"])
    field(root, "address", h["address"])
    hardware = ET.SubElement(root, "hardware_information")
    field(hardware, "manufacturer", "thinair.ovirt lab")
    field(hardware, "uuid", h["hw_id"])
    field(root, "port", 54321)
    field(root, "status", "up")
    field(root, "type", "rhel")
    version(root, "version", *COMPATIBILITY)
    ref(root, "cluster", "clusters", h["cluster_id"])
    return root


def storage_domain(sd: dict, stats: dict, parent_dc: str | None = None) -> ET.Element:
    if parent_dc is None:
        root = entity("storage_domain", "storagedomains", sd["id"])
    else:
        root = ET.Element(
            "storage_domain",
            {"href": href("datacenters", parent_dc, "storagedomains", sd["id"]), "id": sd["id"]},
        )
    field(root, "name", sd["name"])
    field(root, "description", sd["description"])
    for rel in ("disks", "disksnapshots"):
        link(root, rel, href("storagedomains", sd["id"], rel))
    field(root, "available", stats.get("available"))
    field(root, "backup", False)
    field(root, "block_size", 512)
    field(root, "committed", stats.get("committed"))
    field(root, "critical_space_action_blocker", 5)
    field(root, "discard_after_delete", False)
    field(root, "external_status", "ok")
    field(root, "master", bool(sd["master"]))
    field(root, "status", "active")
    storage = ET.SubElement(root, "storage")
    if sd["storage_type"] == "iscsi":
        field(storage, "type", "iscsi")
        group = ET.SubElement(storage, "volume_group", {"id": sd["id"]})
        field(group, "name", sd["id"])
    else:
        field(storage, "address", "localhost")
        field(storage, "nfs_version", "auto")
        field(storage, "path", sd["path"])
        field(storage, "type", sd["storage_type"])
    field(root, "storage_format", "v5")
    field(root, "supports_discard", False)
    field(root, "type", "data")
    field(root, "used", stats.get("used"))
    field(root, "warning_low_space_indicator", 10)
    field(root, "wipe_after_delete", False)
    centers = ET.SubElement(root, "data_centers")
    ref(centers, "data_center", "datacenters", sd["data_center_id"])
    return root


def _disk_fields(root: ET.Element, disk: dict, sizes: dict) -> None:
    field(root, "actual_size", sizes.get("actual_size"))
    field(root, "alias", disk["alias"])
    field(root, "backup", disk["backup"])
    field(root, "content_type", disk["content_type"])
    field(root, "external_disk", disk.get("external_disk"))
    field(root, "format", disk["format"])
    field(root, "image_id", disk["image_id"])
    field(root, "propagate_errors", False)
    field(root, "provisioned_size", disk["provisioned_size"])
    if disk["format"] == "cow":
        field(root, "qcow_version", disk["qcow_version"])
    field(root, "shareable", bool(disk["shareable"]))
    field(root, "sparse", bool(disk["sparse"]))
    field(root, "status", disk["status"])
    field(root, "storage_type", "image")
    field(root, "total_size", sizes.get("total_size"))
    field(root, "wipe_after_delete", bool(disk["wipe_after_delete"]))


def disk(d: dict, sizes: dict) -> ET.Element:
    root = entity("disk", "disks", d["id"])
    field(root, "name", d["alias"])
    field(root, "description", d["description"])
    link(root, "disksnapshots", href("disks", d["id"], "disksnapshots"))
    _disk_fields(root, d, sizes)
    ref(root, "disk_profile", "diskprofiles", disk_profile_id(d["storage_domain_id"]))
    domains = ET.SubElement(root, "storage_domains")
    ref(domains, "storage_domain", "storagedomains", d["storage_domain_id"])
    return root


def disk_profile_id(sd_id: str) -> str:
    """Each storage domain has one disk profile, named after it; its id is
    derived from the domain's."""
    return str(uuid.uuid5(uuid.UUID(sd_id), "disk_profile"))


def disk_profile(sd: dict) -> ET.Element:
    root = entity("disk_profile", "diskprofiles", disk_profile_id(sd["id"]))
    field(root, "name", sd["name"])
    link(root, "permissions", href("diskprofiles", disk_profile_id(sd["id"]), "permissions"))
    ref(root, "storage_domain", "storagedomains", sd["id"])
    return root


def disk_snapshot(d: dict, sizes: dict, parent: str) -> ET.Element:
    """The active volume of a disk as a disk snapshot; parent is the href of its collection."""
    root = ET.Element("disk_snapshot", {"href": f"{parent}/{d['image_id']}", "id": d["image_id"]})
    field(root, "name", d["alias"])
    field(root, "description", d["description"])
    _disk_fields(root, d, sizes)
    ref(root, "disk", "disks", d["id"])
    domains = ET.SubElement(root, "storage_domains")
    ref(domains, "storage_domain", "storagedomains", d["storage_domain_id"])
    return root


def image_transfer(t: dict, transfer_url: str | None, proxy_url: str | None) -> ET.Element:
    root = entity("image_transfer", "imagetransfers", t["id"])
    actions(root, href("imagetransfers", t["id"]), TRANSFER_ACTIONS)
    field(root, "active", bool(t["active"]))
    field(root, "direction", t["direction"])
    field(root, "format", t["format"])
    field(root, "inactivity_timeout", t["inactivity_timeout"])
    field(root, "phase", t["phase"])
    field(root, "proxy_url", proxy_url)
    field(root, "shallow", bool(t["shallow"]))
    field(root, "timeout_policy", t["timeout_policy"])
    field(root, "transfer_url", transfer_url)
    field(root, "transferred", t["transferred"])
    if t["host_id"]:
        ref(root, "host", "hosts", t["host_id"])
    # The engine's mapper emits the image as a bare id (the disk id), no href.
    ref(root, "image", None, t["disk_id"])
    return root


def job(j: dict) -> ET.Element:
    root = entity("job", "jobs", j["id"])
    field(root, "description", j["description"])
    link(root, "steps", href("jobs", j["id"], "steps"))
    field(root, "auto_cleared", True)
    field(root, "end_time", date(j["end_time"]))
    field(root, "external", False)
    field(root, "last_updated", date(j["last_updated"]))
    field(root, "start_time", date(j["start_time"]))
    field(root, "status", j["status"])
    ref(root, "owner", "users", j["owner_id"])
    return root


def _vm_common(root: ET.Element, v: dict) -> None:
    """Fields a VM and a template share, in the engine's order."""
    bios = ET.SubElement(root, "bios")
    menu = ET.SubElement(bios, "boot_menu")
    field(menu, "enabled", False)
    field(bios, "type", "i440fx_sea_bios")
    cpu = ET.SubElement(root, "cpu")
    field(cpu, "architecture", "x86_64")
    topology = ET.SubElement(cpu, "topology")
    field(topology, "cores", v["cores"])
    field(topology, "sockets", v["sockets"])
    field(topology, "threads", v["threads"])
    field(root, "cpu_shares", 0)
    field(root, "delete_protected", False)
    availability = ET.SubElement(root, "high_availability")
    field(availability, "enabled", False)
    field(availability, "priority", 0)
    field(root, "memory", v["memory"])
    policy = ET.SubElement(root, "memory_policy")
    field(policy, "ballooning", True)
    field(policy, "guaranteed", v["memory_guaranteed"])
    field(policy, "max", v["memory_max"])
    field(root, "origin", "ovirt")
    os_element = ET.SubElement(root, "os")
    boot = ET.SubElement(os_element, "boot")
    devices = ET.SubElement(boot, "devices")
    field(devices, "device", "hd")
    field(os_element, "type", v["os_type"])
    field(root, "stateless", False)
    field(root, "storage_error_resume_behaviour", "auto_resume")
    field(root, "type", v["type"])
    usb = ET.SubElement(root, "usb")
    field(usb, "enabled", False)


def vm(v: dict, cl: dict) -> ET.Element:
    root = entity("vm", "vms", v["id"])
    actions(root, href("vms", v["id"]), VM_ACTIONS)
    field(root, "name", v["name"])
    field(root, "description", v["description"])
    field(root, "comment", v["comment"])
    for rel in sorted(VM_LINKS):
        link(root, rel, href("vms", v["id"], rel))
    field(root, "creation_time", date(v["created"]))
    _vm_common(root, v)
    if v["status"] != "down":
        field(root, "start_time", date(v["start_time"]))
    ref(root, "cluster", "clusters", cl["id"])
    if v["host_id"]:
        ref(root, "host", "hosts", v["host_id"])
    field(root, "next_run_configuration_exists", False)
    field(root, "status", v["status"])
    field(root, "stop_time", date(v["stop_time"] or v["created"]))
    ref(root, "original_template", "templates", v["template_id"])
    ref(root, "template", "templates", v["template_id"])
    return root


def template(t: dict) -> ET.Element:
    root = entity("template", "templates", t["id"])
    field(root, "name", t["name"])
    field(root, "description", t["description"])
    for rel in ("diskattachments", "nics", "permissions", "tags", "watchdogs"):
        link(root, rel, href("templates", t["id"], rel))
    values = dict(t, memory_guaranteed=t["memory"], memory_max=t["memory"] * 4)
    _vm_common(root, values)
    field(root, "status", "ok")
    ver = ET.SubElement(root, "version")
    field(ver, "version_name", "")
    field(ver, "version_number", 1)
    ref(ver, "base_template", "templates", t["id"])
    return root


def disk_attachment(a: dict) -> ET.Element:
    root = ET.Element(
        "disk_attachment",
        {"href": href("vms", a["vm_id"], "diskattachments", a["disk_id"]), "id": a["disk_id"]},
    )
    field(root, "active", bool(a["active"]))
    field(root, "bootable", bool(a["bootable"]))
    field(root, "interface", a["interface"])
    field(root, "pass_discard", bool(a["pass_discard"]))
    field(root, "read_only", bool(a["read_only"]))
    field(root, "uses_scsi_reservation", False)
    ref(root, "disk", "disks", a["disk_id"])
    ref(root, "vm", "vms", a["vm_id"])
    return root


def step(st: dict) -> ET.Element:
    root = ET.Element(
        "step", {"href": href("jobs", st["job_id"], "steps", st["id"]), "id": st["id"]}
    )
    field(root, "description", st["description"])
    field(root, "end_time", date(st["end_time"]))
    field(root, "external", False)
    field(root, "number", st["number"])
    field(root, "progress", st["progress"])
    field(root, "start_time", date(st["start_time"]))
    field(root, "status", st["status"])
    field(root, "type", st["type"])
    ref(root, "job", "jobs", st["job_id"])
    return root
