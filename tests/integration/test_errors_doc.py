# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""docs/errors.md is made from tests/integration/errors.py, and every row
names a test that exists."""

from __future__ import annotations

import importlib
import os

from tests.integration import errors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_document_is_made_from_the_table():
    with open(os.path.join(ROOT, "docs", "errors.md")) as f:
        assert f.read() == errors.document(), (
            "docs/errors.md is out of date: python -m tests.integration.errors > docs/errors.md"
        )


def test_every_row_names_a_test():
    for (module, case), (_message, _left, test) in errors.ERRORS.items():
        path, name = test.split("::")
        tests = importlib.import_module("tests.integration." + path.removesuffix(".py"))
        assert callable(getattr(tests, name, None)), (module, case, test)
    assert len(errors.ERRORS) >= 15
