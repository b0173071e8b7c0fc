#!/usr/bin/python
# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_terminate_connections
short_description: End the sessions on a PostgreSQL database so it can be dropped, renamed or restored
version_added: 0.1.0
description:
  - Ends every session connected to O(db) (or those matching the filters) with C(pg_terminate_backend),
    optionally after C(pg_cancel_backend), and waits until none is left, terminating clients that reconnect.
  - With O(block_new_connections) the database is first closed to new connections, so pooled application
    servers that reconnect at once cannot win the race against a following C(DROP DATABASE).
  - O(state=blocked) leaves the database closed for later tasks; O(state=allowed) reopens it.
  - Version aware; C(procpid) before 9.2, C(pid) after; servers older than 8.4 have no C(pg_terminate_backend).
  - When sessions cannot be terminated (server older than 8.4, or a login role that is neither superuser nor
    member of C(pg_signal_backend)), O(fallback=restart) restarts the server instead; without it the module
    fails and names the missing privilege.
  - If anything fails, whatever this call blocked is re-allowed, so a failed call never leaves the database closed;
    a detached watcher does the same if the module process itself is killed.
author:
  - pgops.dbrestore maintainers (@pgops)
extends_documentation_fragment:
  - pgops.dbrestore.postgres
  - pgops.dbrestore.restart
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details: Lists the sessions that would be ended and whether a block would change; changes nothing.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: full
    details: Shows the block state and the number of matching sessions before and after.
options:
  db:
    description:
      - The database whose sessions are ended.
    type: str
    required: true
    aliases: [ name ]
  state:
    description:
      - V(terminated) ends the sessions; a block set by this call is lifted again at the end.
      - V(blocked) ends the sessions and leaves the database closed to new connections (needs O(block_new_connections)).
      - V(allowed) only reopens the database (undoing O(block_new_connections)); no session is ended.
    type: str
    choices: [ terminated, blocked, allowed ]
    default: terminated
  block_new_connections:
    description:
      - How to keep clients out while sessions are ended.
      - V(allow_connections) uses C(ALTER DATABASE ... ALLOW_CONNECTIONS false) (9.5+), which keeps out every
        role, superusers included. Needs the database owner or a superuser.
      - V(revoke_connect) revokes C(CONNECT) from every role that holds it, C(PUBLIC) included (any version);
        superusers still get in. Reopening gives back exactly the grants it took, never more; with O(state=blocked)
        the grants taken are recorded (schema C(pgops_dbrestore) of O(login_db), closed to other roles) so that a
        later O(state=allowed) gives them back.
      - With O(state=allowed) it names the block to undo; V(none) there means V(allow_connections).
    type: str
    choices: [ none, allow_connections, revoke_connect ]
    default: none
  block_roles:
    description:
      - Ignored. V(revoke_connect) now revokes C(CONNECT) from every role that has it and gives exactly those
        grants back.
    type: list
    elements: str
    default: []
  users:
    description:
      - Only end sessions of these roles.
    type: list
    elements: str
    default: []
  exclude_users:
    description:
      - Never end sessions of these roles.
    type: list
    elements: str
    default: []
  application_names:
    description:
      - Only end sessions whose C(application_name) matches one of these shell-style patterns (C(unicorn*)).
    type: list
    elements: str
    default: []
  exclude_application_names:
    description:
      - Never end sessions whose C(application_name) matches one of these patterns.
    type: list
    elements: str
    default: []
  client_addrs:
    description:
      - Only end sessions from these client addresses or CIDR networks; V(local) means unix-socket clients.
    type: list
    elements: str
    default: []
  session_states:
    description:
      - Only end sessions in these states; empty means all.
    type: list
    elements: str
    choices: [ active, idle, idle in transaction, idle in transaction (aborted), fastpath function call, disabled ]
    default: []
  cancel_first:
    description:
      - Cancel the running query (C(pg_cancel_backend)) before terminating, so the client sees a cancellation first.
    type: bool
    default: false
  wait_timeout:
    description:
      - Seconds to keep ending sessions (clients reconnect) before failing with the list of survivors.
    type: float
    default: 30
seealso:
  - module: pgops.dbrestore.pg_restore_db
  - name: pg_terminate_backend
    description: Server signaling functions.
    link: https://www.postgresql.org/docs/current/functions-admin.html#FUNCTIONS-ADMIN-SIGNAL
"""

EXAMPLES = r"""
- name: Close hoge_db, end every session, keep it closed for the restore
  pgops.dbrestore.pg_terminate_connections:
    db: hoge_db
    state: blocked
    block_new_connections: allow_connections
    wait_timeout: 20

- name: Reopen it at the end
  pgops.dbrestore.pg_terminate_connections:
    db: hoge_db
    state: allowed
    block_new_connections: allow_connections

- name: End only idle sessions of the app's unicorn workers
  pgops.dbrestore.pg_terminate_connections:
    db: hoge_db
    users: [webapp]
    application_names: ["unicorn*"]
    session_states: [idle, idle in transaction]

- name: Old server or no pg_signal_backend - restart PostgreSQL through a narrow sudo rule
  pgops.dbrestore.pg_terminate_connections:
    db: hoge_db
    login_user: webapp
    block_new_connections: revoke_connect
    fallback: restart
    restart_command: [/usr/bin/systemctl, restart, postgresql]
    restart_sudo: true
"""

RETURN = r"""
server_version:
  description: Version of the server.
  returned: always
  type: str
  sample: "16.4"
method:
  description: How sessions were ended; V(none) when there was nothing to end.
  returned: always
  type: str
  sample: pg_terminate_backend
terminated:
  description: The sessions ended (in check mode, those that would be).
  returned: always
  type: list
  elements: dict
  sample:
    - pid: 41235
      user: webapp
      application: "unicorn worker[2]"
      client: 10.0.3.15
      state: idle
      backend_start: "2026-11-25T10:01:02.123456+00"
terminated_count:
  description: Number of sessions in RV(terminated).
  returned: always
  type: int
  sample: 12
remaining:
  description: Sessions still connected when the call failed on O(wait_timeout).
  returned: failure
  type: list
  elements: dict
  sample: []
blocked:
  description: Whether the database is closed to new connections when the call returns.
  returned: always
  type: bool
  sample: true
block_method:
  description: The block method in effect.
  returned: always
  type: str
  sample: allow_connections
restarted:
  description: Whether the server was restarted by the fallback.
  returned: always
  type: bool
  sample: false
restart_command:
  description: The restart argv that ran (or would run in check mode).
  returned: always
  type: list
  elements: str
  sample: [systemctl, restart, postgresql]
elapsed_ms:
  description: Milliseconds per phase (connect, block, restart, terminate, unblock) and in total.
  returned: always
  type: dict
  sample: {connect: 4, block: 3, terminate: 212, unblock: 2, total: 224}
sqlstate:
  description: The server's error code when a statement failed (for example C(42501)).
  returned: failure
  type: str
  sample: "42501"
log:
  description: What happened, one line per step, for a person to read.
  returned: always
  type: list
  elements: str
  sample: ['blocked new connections to "hoge_db" (allow_connections)', 'terminated 12 session(s) on "hoge_db" in 212 ms']
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import block_argument_spec
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    PSYCOPG_IMPORT_ERROR,
    ConnParams,
    postgres_common_argument_spec,
    report,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.restart import restart_argument_spec
from ansible_collections.pgops.dbrestore.plugins.module_utils.sessions import (
    BLOCK_CHOICES,
    STATES,
    TARGET_STATES,
    ClearRequest,
    clear_sessions,
)


def main() -> None:
    argument_spec = postgres_common_argument_spec()
    argument_spec.update(
        db=dict(type="str", required=True, aliases=["name"]),
        state=dict(type="str", default="terminated", choices=list(TARGET_STATES)),
        users=dict(type="list", elements="str", default=[]),
        exclude_users=dict(type="list", elements="str", default=[]),
        application_names=dict(type="list", elements="str", default=[]),
        exclude_application_names=dict(type="list", elements="str", default=[]),
        client_addrs=dict(type="list", elements="str", default=[]),
        session_states=dict(type="list", elements="str", default=[], choices=list(STATES)),
        cancel_first=dict(type="bool", default=False),
        wait_timeout=dict(type="float", default=30),
    )
    argument_spec.update(restart_argument_spec())
    argument_spec.update(block_argument_spec(BLOCK_CHOICES, default="none"))
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    if PSYCOPG_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("psycopg"), exception=PSYCOPG_IMPORT_ERROR)

    params = module.params
    report(
        module,
        lambda: clear_sessions(
            ConnParams.from_params(params), ClearRequest.from_params(params), check_mode=module.check_mode
        ),
    )


if __name__ == "__main__":
    main()
