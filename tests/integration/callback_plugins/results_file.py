# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: results_file
type: aggregate
short_description: Write every task result to a JSON file for the tests
description:
  - Appends each task result (ok, changed, failed, skipped, unreachable), with its task and host,
    to a list and writes it as JSON to the file named by the C(THINAIR_TEST_RESULTS) environment
    variable when the playbook ends.
"""

import json  # noqa: E402 - after DOCUMENTATION, as Ansible plugins are laid out
import os  # noqa: E402

from ansible.plugins.callback import CallbackBase  # noqa: E402


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "results_file"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._results = []

    def _record(self, result, **status):
        entry = dict(result._result)
        entry.update(status)
        entry["task"] = result._task.get_name()
        entry["host"] = result._host.get_name()
        self._results.append(entry)

    def v2_runner_on_ok(self, result):
        self._record(result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, failed=True)

    def v2_runner_on_skipped(self, result):
        self._record(result, skipped=True)

    def v2_runner_on_unreachable(self, result):
        self._record(result, unreachable=True)

    def v2_playbook_on_stats(self, stats):
        path = os.environ.get("THINAIR_TEST_RESULTS")
        if path:
            with open(path, "w") as f:
                json.dump(self._results, f, default=str)
