# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Fixtures of the tests that drive the lab engine (the session lab is in ../conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def con(lab):
    """An ovirtsdk4 connection to the lab engine."""
    connection = lab.connection()
    yield connection
    connection.close()


@pytest.fixture
def before(lab):
    """The lab state at the start of a test; the test must leave it so, and
    what a failed test leaves is undone for the next ones."""
    lab.hooks.clear_faults()
    state = lab.hooks.settled()
    yield state
    lab.restore(state)
