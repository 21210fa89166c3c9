# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Errors of the lab's host."""

from __future__ import annotations


class HostError(Exception):
    """The host cannot do what was asked; the message says why."""


class TicketError(HostError):
    """An imageio control request failed with an HTTP status."""

    def __init__(self, status, reason, daemon):
        super().__init__(f"{daemon}: HTTP {status}: {reason}")
        self.status = status
        self.reason = reason
