#!/usr/bin/python
# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_restore_wait
short_description: Wait for a pg_restore_db run started with async, printing its progress at a steady interval
version_added: 0.1.0
description:
  - "Waits for the M(pgops.dbrestore.pg_restore_db) job O(jid) (started with C(async) and C(poll: 0) and
    O(pgops.dbrestore.pg_restore_db#module:progress_dir) set), and every O(interval) seconds prints its progress
    line at default verbosity, such as C(hoge_db: staging 43 % — 12/40 tables, 1.2 of 2.8 GB, 4/16 indexes, 00:01:52)."
  - Returns the result of the restore, and fails as it failed.
  - An action plugin. It runs on the controller, asks the host for the job's status (C(async_status)) and
    reads the progress file there (C(slurp)).
author:
  - pgops.dbrestore maintainers (@pgops)
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: none
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
options:
  jid:
    description:
      - The job id of the restore (C(ansible_job_id) of the task started with C(async)).
    type: str
    required: true
  db:
    description:
      - The database being restored (names its progress file).
    type: str
    required: true
  progress_dir:
    description:
      - The O(pgops.dbrestore.pg_restore_db#module:progress_dir) the restore was given.
    type: str
    required: true
  interval:
    description:
      - Seconds between progress lines.
    type: float
    default: 10
  timeout:
    description:
      - Seconds to wait at most; the restore goes on in the background after that (set it to the C(async) value).
    type: float
    default: 86400
seealso:
  - module: pgops.dbrestore.pg_restore_db
"""

EXAMPLES = r"""
- name: Start restoring hoge_db in the background
  pgops.dbrestore.pg_restore_db:
    db: hoge_db
    src: /var/backups/postgresql/hoge_db.dump
    progress_dir: ~/.cache/pgops-dbrestore/progress
  async: 86400
  poll: 0
  register: restore_job

- name: Wait for it, printing its progress every 10 s
  pgops.dbrestore.pg_restore_wait:
    jid: "{{ restore_job.ansible_job_id }}"
    db: hoge_db
    progress_dir: ~/.cache/pgops-dbrestore/progress
    interval: 10
  register: restored
"""

RETURN = r"""
changed:
  description: Whether the restore changed anything (as RV(pgops.dbrestore.pg_restore_db#module:changed)).
  returned: always
  type: bool
  sample: true
"""
