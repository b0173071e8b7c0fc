#!/usr/bin/python
# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: pg_restore_db
short_description: Restore a live PostgreSQL database from a dump without risking the live data
version_added: 0.1.0
description:
  - Replaces the database O(db), which applications may be connected to, with the contents of the dump O(src).
  - The dump's format is found from its content (custom, directory, tar, plain SQL, gzip/zstd/lz4 compressed plain
    SQL), never from its name. Archives are restored with C(pg_restore --exit-on-error), plain SQL with
    C(psql -v ON_ERROR_STOP=1 --single-transaction), always as argument lists, never through a shell.
  - O(strategy=swap) restores into a staging database, verifies it, and only then, in one short window, blocks and
    clears the live database and renames live to C(<db>_prev_<UTC time>) and staging to O(db) in one transaction.
    The application-visible outage is that window, whatever the size of the database. A failed restore leaves the
    live database untouched and removes the staging copy.
  - O(strategy=replace) blocks and clears the live database, drops it and restores, for hosts without room for two
    copies. It first reads the whole dump (C(pg_restore -f /dev/null), or every line of a plain dump), but a dump
    that reads fine and still fails to load leaves the database gone; prefer V(swap).
  - O(rollback=true) swaps the newest previous copy back in the same safe way; the replaced database is kept as
    C(<db>_undone_<UTC time>). Only copies this collection recorded count as previous copies.
  - Each restore is recorded (the sha256 of the dump, keyed by the database's OID) in the schema C(pgops_dbrestore)
    of the maintenance database O(login_db), owned by the login role and closed to every other role; nothing is
    written into the restored database. The same dump again does nothing (C(changed=false)) unless O(force=true);
    the log then says when it was restored and whether the application wrote to it since. Whether it is the
    same dump is found from the file's identity without reading it (see O(verify_checksum)).
  - Every connection into the target or staging database pins C(search_path) to C(pg_catalog, pg_temp), and
    O(verify_query) runs with the rights of the database's owner, so functions the application's role planted never
    run with the login role's privileges. Plain dumps are loaded by C(psql) in C(\restrict) mode, so a psql
    meta-command in the dump (C(\!) runs a shell command) is refused. The dump is opened once and read from that
    open file for its format, its hash and the load.
  - Database-level settings of the live database (owner, GRANTs on the database, connection limit, comment and
    C(ALTER DATABASE/ROLE ... SET) values) carry over to the restored copy.
  - A PostgreSQL advisory lock per target database stops a second run at once (or queues it with O(lock_timeout)),
    through whichever maintenance database it connects; a session of an unprivileged role holding the key is ended.
    A staging database left behind by a killed run is dropped by the next run; one this collection did not make is
    never dropped.
  - Plain dumps that create or enter their own database (C(pg_dump --create), or files with C(CREATE DATABASE) and
    C(\connect) lines) are restored without those statements, which are listed in RV(stripped_statements).
author:
  - pgops.dbrestore maintainers (@pgops)
extends_documentation_fragment:
  - pgops.dbrestore.postgres
  - pgops.dbrestore.restart
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: full
    details: Reads the dump (format, C(pg_restore -l)), reports the plan (databases to create, rename and drop) and
      whether the marker already matches; changes nothing.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: full
    details: Shows the marker of the live database before and after (dump sha256, format, file name, time).
options:
  db:
    description:
      - The database to restore (created if it does not exist).
    type: str
    required: true
    aliases: [ name ]
  src:
    description:
      - The dump, a file or a pg_dump directory-format directory. Required unless O(rollback=true) or O(source) is set.
    type: path
  source:
    description:
      - A database to refresh O(db) from instead of a dump file (for example production, for a staging server), on any
        server the host that runs the module can reach. C(pg_dump) of it is streamed into the staging copy through a
        pipe, with no file in between, then verified, sanitized and switched as a dump would be.
      - The source is only read; every C(pg_dump) session starts with C(default_transaction_read_only=on) and reads
        one snapshot. With O(jobs) above 1 the snapshot is exported by a C(REPEATABLE READ, READ ONLY) transaction
        of the module on the source, and the data goes through O(jobs) streams of C(pg_dump --section=data |
        pg_restore) at once, each with a share of the tables balanced by size; the schema through a small
        temporary archive, indexes and constraints after the data by C(pg_restore --jobs). A table of at least
        O(parallel_table_mb) in a source of PostgreSQL 14 or later is read by O(jobs) sessions at once, each a
        range of its pages, in the same snapshot. With O(jobs=1), with
        O(tool_args), with a source before PostgreSQL 10, or with client tools 17+ against a server before 17, one
        C(pg_dump) streams plain SQL into C(psql --single-transaction). A source that fails or a run killed midway
        leaves the live database untouched.
      - O(tool_args) go to C(pg_dump) (for example C([--exclude-table-data=sessions])). Only with
        O(strategy=swap). Every run restores (a source has no hash to compare); the record names the source.
    type: dict
    suboptions:
      db:
        description: The database to read.
        type: str
        required: true
      host:
        description: Its server's host name or address; empty is the local unix socket.
        type: str
        default: ""
      port:
        description: Its server's port.
        type: int
        default: 5432
      unix_socket:
        description: Directory of its server's unix socket (wins over O(source.host)).
        type: str
        default: ""
      user:
        description: The role to read it as (C(SELECT) on every table, as for any C(pg_dump)).
        type: str
        default: postgres
      password:
        description: That role's password (or C(~/.pgpass) of the user that runs the module).
        type: str
        default: ""
      ssl_mode:
        description: libpq C(sslmode) of the connection.
        type: str
        default: prefer
        choices: [allow, disable, prefer, require, verify-ca, verify-full]
      connect_timeout:
        description: Seconds to wait for its server.
        type: int
        default: 10
      connect_params:
        description: Other libpq connection parameters.
        type: dict
        default: {}
  strategy:
    description:
      - V(swap) restores next to the live database and switches in one short window.
      - V(replace) drops the live database first (less disk, long outage, no way back if the load fails).
    type: str
    choices: [ swap, replace ]
    default: swap
  rollback:
    description:
      - Swap the newest previous copy this collection recorded back in place of O(db). Fails when there is none.
      - Reads no dump, so O(src) and O(strategy) must be left out.
    type: bool
    default: false
  phase:
    description:
      - V(all) does the whole restore.
      - V(stage) restores and verifies the staging copy and stops there; V(switch) puts a staged copy in place
        (a no-op when O(db) already holds O(src)); V(abort) drops a staged copy. Used to restore a set of databases
        (shards) so that none is switched unless every one staged and verified. Only with O(strategy=swap).
      - V(close) closes O(db) and its staged copy to new connections (O(block_new_connections), what it takes is
        recorded) and ends their sessions; V(open) gives back what V(close) took. A set run as close on every
        host, then switch on every host, then open on every host, is never seen half switched (a session on an
        old copy ends before any restored copy can be reached, and the restored copies stay closed until all
        switched, or, after a failed switch, all rolled back).
    type: str
    choices: [ all, stage, close, switch, open, abort ]
    default: all
  keep_previous:
    description:
      - How many C(<db>_prev_*) copies to keep after a successful swap, and C(<db>_undone_*) copies after a
        rollback; older ones are dropped. V(0) keeps none (and so allows no rollback).
      - The module closes and clears each copy that goes, then hands its C(DROP DATABASE) to a detached session
        that runs it after the module returned (RV(dropping)), since removing a copy's files takes time that grows
        with its size and nothing needs to wait for it. The next run against the same database, restore or
        rollback, waits until that session ended. A copy whose drop failed stays recorded and the next run drops it.
    type: int
    default: 1
  force:
    description:
      - Restore even when the database was already restored from this very dump (for example to undo what the
        application wrote since).
    type: bool
    default: false
  verify_checksum:
    description:
      - How a rerun finds that O(db) already holds O(src) (the C(same dump) check, which makes it a no-op).
      - V(identity) compares the file's identity (device, inode, size, modification and change time, of each file of
        a directory dump) with the one recorded with the restore, and takes the recorded sha256 when they match,
        without reading the dump, so a rerun costs the same at any dump size. When they do not match (the file
        was replaced, copied or touched), or the record is from a version that kept no identity, the whole dump
        is read and hashed as with V(full). Writing a file changes its change time, which nobody can set back.
      - V(full) always reads and hashes the whole dump.
    type: str
    choices: [ identity, full ]
    default: identity
  progress_dir:
    description:
      - "Directory of the progress file of the run, C(<progress_dir>/<db>.json) (the database name %-quoted), created
        if missing. It is replaced atomically every second and at each phase, so another task or a status page
        can read it while the restore runs; M(pgops.dbrestore.pg_restore_wait) prints it as a line such as
        C(hoge_db: staging 43 % — 12/40 tables, 1.2 of 2.8 GB, 4/16 indexes, 00:01:52)."
      - It holds the phase, tables, dump bytes and indexes done of their totals (from the dump's table of contents
        and what C(pg_restore --verbose) reports finished), the running COPYs (C(pg_stat_progress_copy), 14+) and
        index builds (C(pg_stat_progress_create_index), 12+) of the staging copy, the elapsed time, and at the end
        the outcome. No secrets; mode 0644. A file that cannot be written gives a warning, never a failure.
      - With O(source), the totals are the source's tables, their bytes and their indexes; parallel streams are
        counted by what the staging copy holds so far, the single C(psql) stream as its SQL is sent.
      - Unset, no progress is recorded (and C(pg_restore) runs without C(--verbose)).
    type: path
  keep_tables:
    description:
      - "Tables (C(table) in schema C(public), or C(schema.table)) whose live rows are carried into the restored
        copy inside the switch window, replacing the dump's rows: for example C(sessions) of the ActiveRecord
        session store (or a Devise/Authlogic table), so that signed-in users stay signed in. Their own sequences
        (serial, identity) continue from the live values."
      - The rows are copied once the live database is closed and cleared, so no write is lost; the copy's time is
        part of RV(switch_window_ms) and reported in RV(kept_tables).
      - Refused before anything is staged (also in check mode) when a table's columns differ between the live
        database and the dump (with O(source), the source database's tables), when it is missing in either, or
        when the login role is not a superuser. The rows
        are written with C(session_replication_role=replica), so the app's ordinary triggers and the foreign-key
        triggers do not fire (no app code runs with the superuser's rights, and rows may reference rows the
        dump lacks); tables with triggers that fire even then (C(ENABLE ALWAYS), C(ENABLE REPLICA)), or whose
        constraints, indexes or column expressions call functions outside C(pg_catalog), are refused.
      - O(strategy=swap) only.
    type: list
    elements: str
    default: []
  owner:
    description:
      - Owner of the restored database. Default is the owner of the live database (or the login role for a new one).
    type: str
  template:
    description:
      - Template for the new database.
    type: str
    default: template0
  encoding:
    description:
      - Encoding of the new database. Default is the live database's.
    type: str
  lc_collate:
    description:
      - C(LC_COLLATE) of the new database. Default is the live database's.
    type: str
  lc_ctype:
    description:
      - C(LC_CTYPE) of the new database. Default is the live database's.
    type: str
  jobs:
    description:
      - Parallel jobs of C(pg_restore) for custom and directory dumps, and the parallel streams of a O(source)
        refresh. Default is half the CPUs of the host that runs the module (at least 1), so that a live server on
        the same host keeps serving.
    type: int
  parallel_table_mb:
    description:
      - Tables of at least this many MB in the live database are loaded by O(jobs) COPY sessions at once from
        the one dump stream (cut on row boundaries), while C(pg_restore --jobs) loads the other tables; indexes and
        constraints follow with C(pg_restore --jobs), after all the data. C(pg_restore --jobs) alone loads a table
        on one job, so a database dominated by one large table would load it on one core.
      - With O(source), the sizes are the source's (see O(source)).
      - For every dump format, when the live database exists (its table sizes tell which tables are large),
        O(jobs) is more than 1 and O(tool_args) is empty; otherwise the dump is restored as a whole. As a tar
        archive allows no C(pg_restore --jobs), the other tables and the indexes load on one job there, the large
        tables still by O(jobs) sessions. V(0) never splits a table.
      - A plain dump runs in C(psql) sessions one after another around its large tables, not in one transaction.
        A large table's COPY line ends a session (it commits, so the COPY sessions see the table); the next gets
        the dump's settings so far, then the rest. The staging copy is dropped on any failure, as always.
      - The COPY sessions take the dump's settings that concern them (C(client_encoding), C(xmloption), the
        statement and lock timeouts, C(row_security), C(search_path)), as the sessions of C(pg_restore) and
        C(psql) do.
      - Every restore session (and the tools') runs with C(synchronous_commit=off) and a C(maintenance_work_mem)
        sized to the host (an eighth of its memory shared by the jobs, 64 MB to 2 GB); nothing is changed for
        other sessions. The switch commits synchronously, which makes everything loaded before it durable.
    type: int
    default: 256
  bindir:
    description:
      - Directory of the C(pg_restore) and C(psql) to use. Default is the first on C(PATH).
    type: path
  tool_args:
    description:
      - Extra arguments for C(pg_restore) or C(psql), as a list (for example C([--no-owner, --no-privileges])).
    type: list
    elements: str
    default: []
    aliases: [ restore_args ]
  verify_query:
    description:
      - A query run on the restored copy before the switch; its first column must be true, or nothing is switched.
      - It runs with the rights of the copy's owner (the application's role), never the login role's, and resolves
        names with PostgreSQL's default C(search_path) (C("$user", public)).
    type: str
  sanitize:
    description:
      - SQL scripts run on the staging copy after the load and before O(verify_query), C(ANALYZE) and the switch,
        to scrub what must not leave production (e-mail addresses, names, API keys, sessions).
      - An item that is one word ending in C(.sql) is a file on the host that runs the module; any other item is SQL
        itself. Files are read once during the preflight (check mode reports one that cannot be read).
      - Each script runs in one transaction with the rights of the restored copy's owner (O(owner), else the live
        database's owner), never the login role's, inside a C(SECURITY DEFINER) function where every role change
        (C(SET ROLE), C(RESET ROLE)) is refused; an owner that is a superuser is refused. Names resolve with
        C(search_path) C("$user", public). Plain SQL only, no psql meta-commands, no C(COMMIT).
      - A failing script stops the restore; the live database is not touched and the staging copy is dropped.
      - Each script's time is in RV(sanitized); the record of the restore holds a hash of the scripts, so changed
        scripts restore the same dump again.
    type: list
    elements: str
    default: []
  analyze:
    description:
      - Run C(ANALYZE) on the restored copy before the switch, so the first queries get good plans. The tables,
        materialized views and partitioned tables are analyzed largest first over O(jobs) sessions; the system
        catalogs are left to autovacuum.
    type: bool
    default: true
  lock_timeout:
    description:
      - Seconds to wait for another run on the same database to finish. V(0) fails at once.
    type: float
    default: 0
  block_new_connections:
    description:
      - How the live database is closed during the switch (see M(pgops.dbrestore.pg_terminate_connections)).
        V(allow_connections) falls back to V(revoke_connect) on servers older than 9.5.
      - Whatever is closed is given back exactly as it was found (the C(CONNECT) grants, C(datallowconn)).
    type: str
    choices: [ allow_connections, revoke_connect ]
    default: allow_connections
  block_roles:
    description:
      - Ignored. V(revoke_connect) now revokes C(CONNECT) from every role that has it and gives exactly those
        grants back.
    type: list
    elements: str
    default: []
  wait_timeout:
    description:
      - Seconds to keep ending sessions of the live database before giving up (nothing is switched then).
    type: float
    default: 30
  pgbouncers:
    description:
      - The PgBouncers in front of the database. Around the switch each gets C(PAUSE <database>) on its admin console
        (it waits for running transactions, then closes its server connections; its clients' next queries wait),
        and C(RESUME <database>) after it, so clients behind PgBouncer see a pause instead of an error.
      - C(RESUME) is sent on every way out, also when the switch fails or the PAUSE times out, and a guard process
        sends it if the module is killed while PgBouncer is paused.
      - Works with transaction and statement pooling. In session pooling a client holds its server connection while
        connected, so the run is refused (in check mode too) when such clients exist, unless
        O(pgbouncer_fallback=switch).
      - Used by O(strategy=swap), O(phase=switch) and O(rollback=true); refused with O(strategy=replace).
    type: list
    elements: dict
    default: []
    suboptions:
      host:
        description: Address of PgBouncer's admin console.
        type: str
        required: true
      port:
        description: Its port (C(listen_port) of pgbouncer.ini).
        type: int
        default: 6432
      user:
        description: A user listed in C(admin_users) of pgbouncer.ini.
        type: str
        default: pgbouncer
      password:
        description: That user's password.
        type: str
        default: ""
      database:
        description: The database's name in PgBouncer's C([databases]) section, when it differs from O(db).
        type: str
      connect_timeout:
        description: Seconds to wait for the admin console to answer.
        type: int
        default: 5
  pgbouncer_pause_timeout:
    description:
      - Seconds C(PAUSE) may wait for running transactions through PgBouncer. When it takes longer, every PgBouncer is
        resumed and nothing is switched (the staging copy is dropped).
    type: float
    default: 10
  standbys:
    description:
      - Streaming (physical) standbys of the server. A rename replays on a standby without ending its sessions, so a
        session opened there before the switch keeps reading the old copy. After the switch the module waits until
        each standby has replayed past the switch's WAL position, then ends the sessions there still attached to the
        old copy (C(<db>_prev_<UTC time>), or C(<db>_undone_<UTC time>) for a rollback); reconnecting clients read
        the restored data. RV(standbys) reports each one's lag and the sessions ended.
      - The connection to a standby is the primary's (O(login_db), TLS options, O(connect_params)) with its own host
        and port, and, when given, its own user and password. The login role must be a superuser or a member of
        C(pg_signal_backend) (checked before anything is staged, in check mode too). Needs PostgreSQL 10 or newer.
      - When a standby does not replay the switch within O(standby_timeout), the run fails after the switch
        (C(changed=true)) and says what to run there.
      - With O(discover_standbys=true) the entries describe how to reach the standbys found on the primary; an entry
        with a host and no O(standbys[].application_name) is followed as well.
    type: list
    elements: dict
    default: []
    suboptions:
      host:
        description:
          - The standby's address. Required unless O(discover_standbys=true), where it defaults to the address
            C(pg_stat_replication) shows for the standby.
        type: str
      application_name:
        description:
          - With O(discover_standbys=true), the standby this entry describes, by the C(application_name) it streams
            with (C(pg_stat_replication.application_name); C(cluster_name) or C(walreceiver) unless its
            C(primary_conninfo) sets one). Without an application_name, an entry without host gives the port, user
            and password of every discovered standby that no other entry names.
        type: str
      port:
        description: Its port.
        type: int
        default: 5432
      user:
        description: Login role there (default O(login_user)).
        type: str
      password:
        description: Its password (default O(login_password)).
        type: str
  standby_timeout:
    description:
      - Seconds to wait for each standby of O(standbys) to replay the switch.
    type: float
    default: 30
  discover_standbys:
    description:
      - Follow every physical standby streaming from the primary, as C(pg_stat_replication) shows them when the run
        starts (logical walsenders and base backups are left out), reached at the address shown there with the port,
        user and password of its O(standbys) entry. Preflight (check mode too) lists them in the plan and refuses a
        standby it cannot reach, an entry whose application_name is not streaming, two standbys that would be
        reached at the same address, and a login role that cannot see pg_stat_replication's rows (superuser or
        C(pg_read_all_stats) needed).
      - Cascading standbys (streaming from another standby) are not in the primary's C(pg_stat_replication), so list
        them in O(standbys) with their host.
    type: bool
    default: false
  logical_subscriptions:
    description:
      - What to do with enabled subscriptions of the live database (it subscribes to a publisher). A rename leaves
        them streaming into the old copy.
      - V(refuse) (default) refuses the run before anything is staged, in check mode too, naming them.
      - V(hand_over) hands each subscription's slot on the publisher to the restored copy's subscription of the same
        name (pg_dump, run by a superuser, writes it disabled with C(connect = false)). Before the switch the live
        copy's subscriptions are disabled (their workers have exited) and detached from their slots
        (C(SET (slot_name = NONE))); after it the restored copy's take the slots, are enabled where the live ones were,
        and learn the publication's tables (C(REFRESH PUBLICATION WITH (copy_data = false))), so they apply what the
        publisher writes from the moment the live copy stopped, on top of the restored data. Nothing is copied again
        and nothing is lost on the publisher. A switch that fails gives the slots back. The old copy keeps its
        subscriptions disabled and without slot (so a rollback hands them back the same way, and dropping the copy
        touches nothing on the publisher). Needs a superuser login.
      - Disabled subscriptions are not refused; the restored copy has them as dumped (disabled).
    type: str
    choices: [ refuse, hand_over ]
    default: refuse
  logical_slots:
    description:
      - What to do with logical replication slots of the live database (it publishes). A rename leaves them with the
        old copy, which they keep from being dropped.
      - V(refuse) (default) refuses the run before anything is staged, in check mode too, naming them.
      - V(recreate), after the switch, ends the walsender streaming from each slot, drops it and creates it again
        with the same name, plugin and two_phase on the restored copy. Its consumer then reads what the restored copy
        writes from the switch on. What the old copy wrote that the consumer had not read yet is lost, and the
        restored data itself is not sent, so a subscriber keeps its old rows and must copy the tables again if it has to
        match the restored data. Needs a superuser or a role with REPLICATION.
    type: str
    choices: [ refuse, recreate ]
    default: refuse
  pgbouncer_fallback:
    description:
      - V(switch) switches without pausing a PgBouncer that cannot be paused (session pooling with connected clients);
        its clients see their sessions end, as without O(pgbouncers). V(none) refuses the run instead.
    type: str
    choices: [ none, switch ]
    default: none
notes:
  - Needs C(CREATEDB) (or superuser) and the right to end the live database's sessions (see
    M(pgops.dbrestore.pg_terminate_connections)).
  - O(db) must not be O(login_db), where the maintenance connection holds the lock and our records.
  - A failure returns what was done so far (RV(log), RV(steps_done), RV(created), RV(renamed), RV(dropped),
    RV(phases_ms)), RV(sqlstate) when the server refused a statement, and C(changed=true) when anything changed.
  - The staging database is named C(<db>_pgops_staging); names longer than 36 bytes are shortened with a hash
    for the staging and previous copies, to fit PostgreSQL's 63-byte limit.
seealso:
  - module: pgops.dbrestore.pg_terminate_connections
"""

EXAMPLES = r"""
- name: Restore hoge_db from last night's dump while the app is running
  pgops.dbrestore.pg_restore_db:
    db: hoge_db
    src: /var/backups/postgresql/hoge_db.dump
    verify_query: SELECT count(*) > 0 FROM users
    analyze: true
  register: restored

- name: Show what happened and how to undo it
  ansible.builtin.debug:
    msg:
      - "outage {{ restored.switch_window_ms }} ms, {{ restored.terminated_count }} sessions ended"
      - "old copy: {{ restored.previous_db }}"
      - "undo: ansible-playbook pgops.dbrestore.rollback -e db=hoge_db"

- name: Roll back to the copy from before the restore
  pgops.dbrestore.pg_restore_db:
    db: hoge_db
    rollback: true

- name: Restore production's dump into staging, scrubbed before the switch
  pgops.dbrestore.pg_restore_db:
    db: shop_staging
    src: /var/backups/postgresql/shop.dump
    owner: shop
    sanitize:
      - /etc/pgops/scrub_users.sql
      - TRUNCATE sessions, api_keys

- name: Refresh staging straight from production, scrubbed, with no dump file on either host
  pgops.dbrestore.pg_restore_db:
    db: shop_staging
    owner: shop
    source:
      host: db-prod1.example.internal
      db: shop
      user: readonly_dumper
      password: "{{ vault_readonly_dumper_password }}"
    tool_args: [--exclude-table-data=sessions]
    sanitize: [/etc/pgops/scrub_users.sql]

- name: Small disk - drop and restore in place (long outage)
  pgops.dbrestore.pg_restore_db:
    db: hoge_db
    src: /var/backups/postgresql/hoge_db.sql.zst
    strategy: replace

- name: Restore behind PgBouncer (transaction pooling); its clients wait for the switch instead of failing
  pgops.dbrestore.pg_restore_db:
    db: hoge_db
    src: /var/backups/postgresql/hoge_db.dump
    pgbouncers:
      - host: 10.0.0.7
        user: pgbouncer
        password: "{{ vault_pgbouncer_admin_password }}"
        database: hoge  # its name in pgbouncer.ini [databases]
    pgbouncer_pause_timeout: 5
  register: restored  # restored.pgbouncer_pause_ms: the longest a pooled query waited
"""

RETURN = r"""
db:
  description: The restored database.
  returned: always
  type: str
  sample: hoge_db
strategy:
  description: V(swap), V(replace) or V(rollback).
  returned: always
  type: str
  sample: swap
format:
  description: The dump format found from its content, or V(server) for a O(source) database.
  returned: unless rollback
  type: str
  sample: custom
sha256:
  description: sha256 of the dump (of all its files, for a directory dump).
  returned: unless rollback
  type: str
  sample: 9f2c0e5d4b0b6c5e8a3d1f7e2a9b4c6d8e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b
checksum_by:
  description: How RV(sha256) was found. V(identity) - taken from our record, as the file's identity matched it (the
    dump was not read). V(full) - the dump was read and hashed.
  returned: unless rollback
  type: str
  sample: identity
jobs:
  description: The jobs this run loads with, O(jobs) or its default (half the CPUs of the host that runs the module).
  returned: always
  type: int
  sample: 2
busy_pids:
  description: In check mode, the backends of another restore of the database that hold its restore lock now; a
    real run waits O(lock_timeout) for them, then fails. Empty otherwise.
  returned: always
  type: list
  elements: int
  sample: []
server_version:
  description: Version of the server.
  returned: always
  type: str
  sample: "16.4"
marker_before:
  description: Our record of the dump the live database was restored from, or null (C(writes) is its row-change
    counter right after that restore).
  returned: always
  type: dict
  sample: {sha256: 9f2c..., format: custom, size: 1048576, src: hoge_db.dump, restored_at: "2026-11-24T03:00:12Z",
           writes: 15607, identity: "[[2049,1835122,1048576,1764039612000000000,1764039612000000000,\"\"]]"}
marker_after:
  description: Our record of the database after the run.
  returned: success
  type: dict
  sample: {sha256: 4be1..., format: custom, size: 1050112, src: hoge_db.dump, restored_at: "2026-11-25T03:00:09Z",
           writes: 15607, identity: "[[2049,1835133,1050112,1764126009000000000,1764126009000000000,\"\"]]"}
staging_db:
  description: Name of the staging database used.
  returned: unless rollback
  type: str
  sample: hoge_db_pgops_staging
phase:
  description: The phase that ran.
  returned: always
  type: str
  sample: all
staged:
  description: Whether a verified staging copy now waits for O(phase=switch).
  returned: always
  type: bool
  sample: false
live_size_bytes:
  description: Size of the live database before the restore (0 when unknown), for disk-space checks.
  returned: always
  type: int
  sample: 734003200
data_directory:
  description: The server's data directory, when the login role may read it (superuser, pg_read_all_settings).
  returned: always
  type: str
  sample: /var/lib/postgresql/15/main
previous_db:
  description: The copy the live database was renamed to (swap), or the copy swapped back (rollback).
  returned: always
  type: str
  sample: hoge_db_prev_20261125T030009123Z
created:
  description: Databases created by this run and still there (failed runs drop their staging copy).
  returned: always
  type: list
  elements: str
  sample: [hoge_db_pgops_staging]
renamed:
  description: Renames this run committed, as C(old -> new).
  returned: always
  type: list
  elements: str
  sample: ["hoge_db -> hoge_db_prev_20261125T030009123Z", "hoge_db_pgops_staging -> hoge_db"]
dropped:
  description: Databases dropped (leftover staging, copies beyond O(keep_previous), the live one with V(replace)).
  returned: always
  type: list
  elements: str
  sample: [hoge_db_prev_20261124T030011456Z]
dropping:
  description:
    - Copies beyond O(keep_previous) whose C(DROP DATABASE) a detached session runs after the module returned (see
      O(keep_previous)); closed and cleared already. Empty when that session could not start (then RV(dropped)
      lists them).
  returned: always
  type: list
  elements: str
  sample: [hoge_db_prev_20261124T030011456Z]
terminated:
  description: The sessions ended during the switch (pid, user, application, client, state, backend_start).
  returned: always
  type: list
  elements: dict
  sample: [{pid: 4242, user: webapp, application: "unicorn worker[0]", client: 10.0.0.5, state: idle,
            backend_start: "2026-11-25T02:00:00.000000+00"}]
terminated_count:
  description: How many sessions were ended during the switch.
  returned: always
  type: int
  sample: 24
restarted:
  description: Whether the server was restarted by the fallback.
  returned: always
  type: bool
  sample: false
switch_window_ms:
  description: Milliseconds the database was closed to the application (block, terminate, rename).
  returned: always
  type: int
  sample: 180
pgbouncer_pause_ms:
  description: Milliseconds from C(PAUSE) to the last C(RESUME) on the PgBouncers of O(pgbouncers) (0 without them),
    the longest a query through them waited.
  returned: always
  type: int
  sample: 40
pgbouncer_window_ms:
  description:
    - Where the pause of RV(pgbouncer_pause_ms) went, in milliseconds per step (empty without O(pgbouncers)).
      V(pause) waiting for C(PAUSE) (running transactions), V(close) closing the live database, V(terminate) ending
      what is left on it, V(keep) carrying O(keep_tables), V(rename) the renames' transaction, V(resume) C(RESUME),
      V(other) the rest, V(total) the pause.
    - Everything else (the admin consoles' connections, the guard processes, the lookups) is done before C(PAUSE).
  returned: always
  type: dict
  sample: {pause: 6, close: 2, terminate: 5, rename: 6, resume: 1, other: 8, total: 28}
logical:
  description:
    - With O(logical_subscriptions=hand_over), the subscriptions handed over (name, slot, enabled); with
      O(logical_slots=recreate), the slots recreated (name, plugin, lsn where the new slot starts).
  returned: always
  type: dict
  sample: {subscriptions: [{name: orders_sub, slot: orders_sub, enabled: true}],
           slots: [{name: reporting, plugin: pgoutput, lsn: "0/3000148"}]}
standbys:
  description: Per standby of O(standbys), whether it replayed the switch, how far behind it was (bytes) and how long
    it took (ms), and how many sessions on the old copy were ended there.
  returned: always
  type: list
  elements: dict
  sample: [{address: "10.0.0.9:5432", application_name: db2, replayed: true, lag_bytes: 5120, lag_ms: 14,
            sessions_ended: 8, error: ""}]
pgbouncers:
  description: Per PgBouncer of O(pgbouncers), what happened there.
  returned: always
  type: list
  elements: dict
  sample: [{address: "10.0.0.7:6432", database: hoge_db, paused: true, skipped: "", drain_ms: 12, resumed: true}]
switched_at:
  description: UNIX time (seconds, on the host that runs the module) at which the switch committed, V(0) when
    nothing was switched. The restore role reports the spread between the first and the last switch of a set.
  returned: always
  type: float
  sample: 1795575609.123
closed_at:
  description: With O(phase=close), UNIX time at which the close started, V(0) otherwise.
  returned: always
  type: float
  sample: 1795575608.871
opened_at:
  description: With O(phase=open), UNIX time at which the databases were open again, V(0) when nothing was reopened.
  returned: always
  type: float
  sample: 1795575609.342
kept_tables:
  description:
    - With O(keep_tables), the rows carried per table and the milliseconds the copy took inside the window (part of
      RV(switch_window_ms)); empty without.
  returned: always
  type: dict
  sample: {"rows": {"public.sessions": 412}, "ms": 35}
phases_ms:
  description: Milliseconds per phase (lock, inspect, preflight, leftover, stage, sanitize, verify, switch, prune, total).
  returned: always
  type: dict
  sample: {lock: 1, inspect: 40, preflight: 90, stage: 5400, verify: 120, switch: 180, prune: 300, total: 6131}
sanitized:
  description: The O(sanitize) scripts that ran, in order, with the sha256 of their SQL and their milliseconds.
  returned: always
  type: list
  elements: dict
  sample: [{name: /etc/pgops/scrub_users.sql, sha256: 3f1c..., ms: 842}, {name: "inline #2", sha256: 9ab0..., ms: 12}]
stripped_statements:
  description: Statements of a plain dump that were left out because they act on other databases.
  returned: always
  type: list
  elements: str
  sample: ["DROP DATABASE IF EXISTS chinook;", "CREATE DATABASE chinook;", "\\c chinook;"]
rollback:
  description: Module arguments that undo this restore (empty when no previous copy was kept).
  returned: always
  type: dict
  sample: {db: hoge_db, rollback: true}
rollback_sql:
  description: The same undo as SQL statements, for a person at psql.
  returned: always
  type: list
  elements: str
  sample: ['ALTER DATABASE "hoge_db" ALLOW_CONNECTIONS false;', '...']
plan:
  description: The steps, in order; check mode reports the very list the real run walks.
  returned: always
  type: list
  elements: str
  sample: ['create "hoge_db_pgops_staging" and restore custom dump into it', 'verify it', 'block and clear "hoge_db"']
steps_done:
  description: The steps of RV(plan) that completed (on failure, the ones before the failing step).
  returned: always
  type: list
  elements: str
  sample: ['create "hoge_db_pgops_staging" and restore the custom dump into it']
log:
  description: What happened, one line per step; values of carried-over settings are masked.
  returned: always
  type: list
  elements: str
  sample: ['restored the custom dump into "hoge_db_pgops_staging"']
sqlstate:
  description: The server's error code when a statement failed (for example C(55006), C(42501)).
  returned: failure
  type: str
  sample: "42501"
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import CHOICES as BLOCK_CHOICES
from ansible_collections.pgops.dbrestore.plugins.module_utils.blocking import block_argument_spec
from ansible_collections.pgops.dbrestore.plugins.module_utils.logical import logical_argument_spec
from ansible_collections.pgops.dbrestore.plugins.module_utils.pooler import pgbouncers_argument_spec
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    PSYCOPG_IMPORT_ERROR,
    ConnParams,
    postgres_common_argument_spec,
    report,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.restart import restart_argument_spec
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import (
    CHECKSUM_CHOICES,
    RestoreRequest,
    restore_database,
)
from ansible_collections.pgops.dbrestore.plugins.module_utils.standbys import standbys_argument_spec
from ansible_collections.pgops.dbrestore.plugins.module_utils.strategies import PHASES, STRATEGIES


def main() -> None:
    argument_spec = postgres_common_argument_spec()
    argument_spec.update(restart_argument_spec())
    argument_spec.update(
        db=dict(type="str", required=True, aliases=["name"]),
        src=dict(type="path"),
        source=dict(
            type="dict",
            options=dict(
                db=dict(type="str", required=True),
                host=dict(type="str", default=""),
                port=dict(type="int", default=5432),
                unix_socket=dict(type="str", default=""),
                user=dict(type="str", default="postgres"),
                password=dict(type="str", default="", no_log=True),
                ssl_mode=dict(
                    type="str",
                    default="prefer",
                    choices=["allow", "disable", "prefer", "require", "verify-ca", "verify-full"],
                ),
                connect_timeout=dict(type="int", default=10),
                connect_params=dict(type="dict", default={}),
            ),
        ),
        strategy=dict(type="str", default="swap", choices=list(STRATEGIES)),
        rollback=dict(type="bool", default=False),
        phase=dict(type="str", default="all", choices=list(PHASES)),
        keep_previous=dict(type="int", default=1),
        force=dict(type="bool", default=False),
        verify_checksum=dict(type="str", default="identity", choices=list(CHECKSUM_CHOICES)),
        progress_dir=dict(type="path"),
        keep_tables=dict(type="list", elements="str", default=[]),
        parallel_table_mb=dict(type="int", default=256),
        owner=dict(type="str"),
        template=dict(type="str", default="template0"),
        encoding=dict(type="str"),
        lc_collate=dict(type="str"),
        lc_ctype=dict(type="str"),
        jobs=dict(type="int"),
        bindir=dict(type="path"),
        tool_args=dict(type="list", elements="str", default=[], aliases=["restore_args"]),
        verify_query=dict(type="str"),
        sanitize=dict(type="list", elements="str", default=[]),
        analyze=dict(type="bool", default=True),
        lock_timeout=dict(type="float", default=0),
        wait_timeout=dict(type="float", default=30),
    )
    argument_spec.update(block_argument_spec(BLOCK_CHOICES, default="allow_connections"))
    argument_spec.update(pgbouncers_argument_spec())
    argument_spec.update(standbys_argument_spec())
    argument_spec.update(logical_argument_spec())
    module = AnsibleModule(
        argument_spec=argument_spec, mutually_exclusive=[["src", "source"]], supports_check_mode=True
    )
    if PSYCOPG_IMPORT_ERROR:
        module.fail_json(msg=missing_required_lib("psycopg"), exception=PSYCOPG_IMPORT_ERROR)
    params = module.params
    report(
        module,
        lambda: restore_database(
            ConnParams.from_params(params), RestoreRequest.from_params(params), check_mode=module.check_mode
        ),
    )


if __name__ == "__main__":
    main()
