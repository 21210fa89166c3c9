# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The lab's oVirt engine: REST API v4, SSO, disks, image transfers and jobs."""

from __future__ import annotations

from lab.engine.core import Engine, Settings

__all__ = ["Engine", "Settings"]
