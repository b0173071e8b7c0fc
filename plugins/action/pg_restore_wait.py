# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Wait for a pg_restore_db started with async, printing its progress line at a steady interval."""

from __future__ import annotations

import base64
import json
import time

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

from ansible_collections.pgops.dbrestore.plugins.module_utils.progress import progress_line, progress_path

display = Display()
# how often the job is asked whether it finished (at most), so a finished restore is not kept waiting
STATUS_EVERY = 2.0


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(("jid", "db", "progress_dir", "interval", "timeout"))

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        _valid, args = self.validate_argument_spec(
            argument_spec={
                "jid": {"type": "str", "required": True},
                "db": {"type": "str", "required": True},
                "progress_dir": {"type": "str", "required": True},
                "interval": {"type": "float", "default": 10.0},
                "timeout": {"type": "float", "default": 86400.0},
            },
        )
        async_dir = self._remote_expand_user(self.get_shell_option("async_dir", default="~/.ansible_async"))
        status_args = {"jid": args["jid"], "_async_dir": async_dir}
        path = progress_path(args["progress_dir"], args["db"])
        interval = max(args["interval"], 0.5)
        started = time.monotonic()
        next_line = started + interval
        self._offset = None  # the run's elapsed time minus ours, from the first progress file read
        while True:
            status = self._execute_module("ansible.legacy.async_status", module_args=status_args, task_vars=task_vars)
            if status.get("finished") or (status.get("failed") and not status.get("started")):
                break
            now = time.monotonic()
            if now - started > args["timeout"]:
                raise AnsibleActionFail(
                    f"{args['db']}: the restore is still running after {args['timeout']:.0f} s (job {args['jid']}); "
                    "it goes on in the background: raise restore_async_timeout, and look at its progress file "
                    f"{path}"
                )
            if now >= next_line:
                line = self._line(path, task_vars)
                if line:
                    display.display(line)
                next_line += interval * (1 + int((now - next_line) // interval))
            time.sleep(max(0.0, min(STATUS_EVERY, next_line - time.monotonic())))
        self._execute_module("ansible.legacy.async_status", module_args={**status_args, "mode": "cleanup"},
                             task_vars=task_vars)  # fmt: skip
        for key in ("ansible_job_id", "started", "finished", "results_file", "stdout", "stdout_lines", "stderr",
                    "stderr_lines", "erased"):  # fmt: skip
            status.pop(key, None)
        result.update(status)
        return result

    def _line(self, path, task_vars):
        """The progress line from the file on the database host, or None while there is none."""
        got = self._execute_module("ansible.legacy.slurp", module_args={"src": path}, task_vars=task_vars)
        if got.get("failed") or "content" not in got:
            return None
        try:
            data = json.loads(base64.b64decode(got["content"]))
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("state") != "running":
            return None  # not yet this run's: the file of an earlier run, until this one holds the lock
        now = time.monotonic()
        if self._offset is None:  # from here on the clock is ours: one line per interval, one interval apart
            self._offset = float(data.get("elapsed_s", 0)) - now
        return progress_line(data, elapsed_s=now + self._offset)
