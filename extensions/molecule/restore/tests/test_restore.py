"""The restore user story, end to end, checked after converge (ansible-playbook pgops.dbrestore.restore -e db=hoge_db).

db1 runs Debian's PostgreSQL as a systemd service; web1 runs a client loop that queries hoge_db
over the network every 0.2 s and reconnects when its session is ended (log lines
"<unix time> ok <invoice_line rows> <artist rows> <backend pid>" or "<unix time> fail <error>").
prepare.yml deleted invoice lines and added an artist in the live hoge_db after the dump, so the
dump's rows and the old rows can be told apart.

The tests build on each other and run in file order: after the converge checks come --check,
rollback, the web trigger, the restart fallback and the set of shards across db1 and db2, read all
along by web1's Octopus-style shard reader ("<unix time> ok|MIXED <generations>" or "fail").
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import testinfra

DB_HOST = "pgops-restore-db1"
DB2_HOST = "pgops-restore-db2"
WEB_HOST = "pgops-restore-web1"
SCENARIO_DIR = Path(__file__).resolve().parent.parent
REPO = SCENARIO_DIR.parents[2]
DUMP = "/var/backups/postgresql/hoge_db.chinook.dump"
TRIGGER = "/usr/local/sbin/pgops-restore"
CLIENT_LOG = "/var/log/pgops-client-loop.log"
SHARD_LOG = "/var/log/pgops-shard-reader.log"
SHARDS = {"shard1": DB_HOST, "shard2": DB_HOST, "shard3": DB2_HOST}  # group_vars/all.yml
SET = ["-e", "dbs=shard1,shard2,shard3", "-e", "db_hosts=db:shardhosts"]
TABLES = [
    "album", "artist", "customer", "employee", "genre", "invoice",
    "invoice_line", "media_type", "playlist", "playlist_track", "track",
]  # fmt: skip
# What prepare.yml did to the live copy after the dump.
OLD_INVOICE_LINES = 2000
EXTRA_ARTISTS = 1


@pytest.fixture(scope="module")
def web():
    return testinfra.get_host(f"podman://{WEB_HOST}")


def psql(host, db, query):
    return host.check_output("runuser -u postgres -- psql -XAtq -v ON_ERROR_STOP=1 -d %s -c %s", db, query)


def recorded(host, column, login_db="postgres"):
    """What the collection recorded of hoge_db's restore, in the maintenance database it logged in to."""
    query = (f"SELECT r.{column} FROM pgops_dbrestore.restored r JOIN pg_database d ON d.oid = r.datoid "
             "WHERE d.datname = 'hoge_db'")  # fmt: skip
    return psql(host, login_db, query)


def counts(host, db):
    query = "SELECT json_build_object(" + ", ".join(f"'{t}', (SELECT count(*) FROM {t})" for t in TABLES) + ")"
    return json.loads(psql(host, db, query))


def databases(host):
    return psql(host, "postgres", "SELECT datname FROM pg_database ORDER BY datname").splitlines()


def generations():
    hosts = {name: testinfra.get_host(f"podman://{name}") for name in (DB_HOST, DB2_HOST)}
    return {db: psql(hosts[name], db, "SELECT g FROM generation") for db, name in SHARDS.items()}


def snapshot(host):
    """Everything a refused or check-mode run must leave as it was."""
    db2 = testinfra.get_host(f"podman://{DB2_HOST}")
    return databases(host), databases(db2), counts(host, "hoge_db"), generations()


def sudo_as(host, user, *argv):
    """`sudo -n argv` as `user` with no controlling terminal, like a web server worker."""
    words = ["runuser", "-u", user, "--", "setsid", "-w", "sudo", "-n", *argv]
    return host.run(" ".join(["%s"] * len(words)), *words)


def run_playbook(playbook, *extra):
    """Run one of the collection's playbooks by name (restore: pgops.dbrestore.restore, as a user runs it), or a
    playbook file, against the scenario's inventory."""
    cmd = [
        str(Path(sys.executable).with_name("ansible-playbook")),
        "-i", str(SCENARIO_DIR / "inventory" / "hosts.yml"),
        *extra,
        playbook if playbook.endswith(".yml") else f"pgops.dbrestore.{playbook}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml",
        "ANSIBLE_COLLECTIONS_PATH": str(REPO / ".cache" / "collections"),
    }
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False)


def run_scenario_playbook(playbook, *extra):
    """Run one of this scenario's own playbooks against its inventory."""
    return run_playbook(str(SCENARIO_DIR / playbook), *extra)


def client_log(web):
    """The client loop's log as (time, status, rest) tuples."""
    rows = []
    for line in web.check_output("cat %s", CLIENT_LOG).splitlines():
        stamp, status, rest = [*line.split(" ", 2), "", ""][:3]
        rows.append((float(stamp), status, rest))
    return rows


def previous_copies(host, db="hoge_db"):
    return [d for d in databases(host) if d.startswith(f"{db}_prev_")]


@pytest.fixture(scope="module")
def dump_counts(host):
    """Row counts of the dump itself, restored into a scratch database."""
    host.check_output("runuser -u postgres -- createdb pgops_scratch")
    try:
        host.check_output("runuser -u postgres -- pg_restore -d pgops_scratch %s", DUMP)
        return counts(host, "pgops_scratch")
    finally:
        host.check_output("runuser -u postgres -- dropdb pgops_scratch")


def old_counts(dump_counts):
    return {
        **dump_counts,
        "invoice_line": OLD_INVOICE_LINES,
        "artist": dump_counts["artist"] + EXTRA_ARTISTS,
    }


# --- converge ---------------------------------------------------------------------------------


def test_postgresql_is_the_debian_systemd_service(host):
    assert host.package("postgresql").is_installed
    assert host.service("postgresql@15-main").is_running


def test_hoge_db_holds_the_dump(host, dump_counts):
    assert counts(host, "hoge_db") == dump_counts
    assert recorded(host, "src") == "hoge_db.chinook.dump"


def test_previous_copy_is_kept_closed(host):
    """Its rows are checked by the rollback test below; it takes no connections meanwhile."""
    prev = previous_copies(host)
    assert len(prev) == 1, databases(host)
    query = f"SELECT datallowconn FROM pg_database WHERE datname = '{prev[0]}'"
    assert psql(host, "postgres", query) == "f"


def test_client_reconnected_after_the_switch(host, web, dump_counts):
    stamp = previous_copies(host)[0].rsplit("_", 1)[1]  # 20261125T170236685Z: start of the switch, UTC
    switch = datetime.strptime(stamp[:-4], "%Y%m%dT%H%M%S").replace(tzinfo=UTC).timestamp()
    switch += int(stamp[-4:-1]) / 1000
    rows = client_log(web)
    before = [r for r in rows if r[0] < switch - 1]
    after = [r for r in rows if r[0] > switch + 1]
    assert before and after, (switch, rows[:3], rows[-3:])
    old_pids = {r[2].split()[2] for r in before if r[1] == "ok"}
    assert f"{OLD_INVOICE_LINES} {dump_counts['artist'] + EXTRA_ARTISTS}" in before[-1][2]
    # its session was ended by the switch (the log shows the error) ...
    ended = next(r for r in rows if r[0] > switch - 1 and r[1] == "fail")
    assert ended[0] - switch < 5, ended
    # ... and it reconnected within seconds, to the restored data, on a new session
    first_ok = next(r for r in rows if r[0] > ended[0] and r[1] == "ok")
    assert first_ok[0] - ended[0] < 5
    restored = f"{dump_counts['invoice_line']} {dump_counts['artist']} "
    assert first_ok[2].startswith(restored)
    assert first_ok[2].split()[2] not in old_pids
    assert all(r[1] == "ok" and r[2].startswith(restored) for r in after[-20:]), after[-20:]


# --- --check ----------------------------------------------------------------------------------


# (check mode of a set across hosts: tests/integration/test_cross_host.py, not here, for the scenario's time)
def test_check_mode_changes_nothing(host):
    before = snapshot(host)
    result = run_playbook("restore", "--check", "-e", "db=hoge_db", "-e", "force=true")
    assert result.returncode == 0, result.stdout
    assert "would" in result.stdout or "restore" in result.stdout
    assert snapshot(host) == before


# --- rollback ---------------------------------------------------------------------------------


def test_rollback_restores_the_old_rows(host, dump_counts):
    result = run_playbook("rollback", "-e", "db=hoge_db")
    assert result.returncode == 0, result.stdout
    assert counts(host, "hoge_db") == old_counts(dump_counts)
    assert [d for d in databases(host) if d.startswith("hoge_db_undone_")], databases(host)


# --- web trigger ------------------------------------------------------------------------------


# what the web app runs, as docs/web-trigger.md shows it: as postgres, never as root
APP_COMMAND = "sudo -n -u postgres /usr/local/sbin/pgops-restore start hoge_db"
STATUS_COMMAND = "sudo -n -u postgres /usr/local/sbin/pgops-restore status hoge_db"
AS_POSTGRES = ["-u", "postgres"]
TRIGGER_CONFIG = "/etc/pgops-restore.json"
TRIGGER_LIB = "/usr/local/lib/pgops-dbrestore/ansible_collections/pgops/dbrestore/plugins/module_utils"


def app_runs(host, command):
    result = sudo_as(host, "webapp", *shlex.split(command)[2:])
    assert result.stderr == "", result.stderr
    return result.rc, json.loads(result.stdout)  # exactly one JSON line


def app_restores(host):
    """The app starts a restore of hoge_db and polls its status until it ends; returns (start, status) answers."""
    code, started = app_runs(host, APP_COMMAND)
    assert code == 0 and started["ok"] is True and started["state"] == "queued", started
    deadline = time.monotonic() + 120
    while True:  # the restore runs detached; the app polls its status
        code, answer = app_runs(host, STATUS_COMMAND)
        assert code == 0 and answer["job"] == started["job"], answer
        if answer["state"] in ("done", "failed"):
            return started, answer
        assert time.monotonic() < deadline, answer
        time.sleep(0.5)


def test_web_trigger_restores_for_the_app_user(host, dump_counts):
    assert shlex.split(APP_COMMAND)[:2] == ["sudo", "-n"]
    _started, answer = app_restores(host)
    assert answer["state"] == "done", answer
    assert answer["outcome"]["changed"] is True
    assert answer["outcome"]["previous_db"].startswith("hoge_db_prev_")
    assert counts(host, "hoge_db") == dump_counts
    # sudo ran it as postgres, which logged in over the unix socket by peer authentication
    journal = host.check_output("journalctl -q --no-pager -t sudo --since -5min")
    assert "USER=postgres ; COMMAND=/usr/local/sbin/pgops-restore start hoge_db" in journal
    assert recorded(host, "restored_by") == "postgres"


@pytest.mark.parametrize(
    "argv",
    [
        ["hoge_db"],  # the foreground form: not for the web app
        ["run", "hoge_db"],
        ["start", "other_db"],
        ["status", "postgres"],
        ["start", "hoge_db", "hoge_db.chinook.dump"],  # a dump name is not allowed without restore_web_trigger_any_dump
        ["other_db"],
        ["postgres"],
        ["hoge_db", "../../etc/shadow"],
        ["hoge_db", "../postgresql/hoge_db.chinook.dump"],
        ["hoge_db", "hoge_db.chinook.dump"],  # a dump name is not allowed without restore_web_trigger_any_dump
        ["hoge_db", "--force"],
        ["--config=/tmp/x", "hoge_db"],
        ["hoge_db;id"],
        ["hoge_db", ";", "id"],
        ["$(id)"],
        ["hoge_db", "|", "sh"],
        [],
    ],
    ids=lambda argv: " ".join(argv) or "no arguments",
)
def test_web_trigger_refuses_bad_requests(host, argv):
    before = snapshot(host)
    result = sudo_as(host, "webapp", *AS_POSTGRES, TRIGGER, *argv)
    assert result.rc == 1
    assert "a password is required" in result.stderr
    assert snapshot(host) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["other_db"],
        ["hoge_db", "../backups/postgresql/hoge_db.chinook.dump"],
        ["hoge_db", "/var/backups/postgresql/hoge_db.chinook.dump"],
        ["hoge_db", "hoge_db;id"],
        ["hoge_db", "--force"],
        ["hoge_db", "a", "b"],
        ["hoge_db", "hoge_db.outside.dump"],  # a link out of the backup directory
        ["hoge_db", "hoge_db.dangling.dump"],
        ["hoge_db", "hoge_db.chinook.dump.sha256"],
        ["hoge_db", "shard1.base.dump"],  # another database's dump
    ],
    ids=" ".join,
)
def test_web_trigger_command_itself_refuses(host, argv, hostile_dumps):
    """Even past sudo (run as postgres directly), the command validates its arguments: exit 2, one JSON line."""
    before = snapshot(host)
    result = host.run(" ".join(["%s"] * (len(argv) + 5)), "runuser", "-u", "postgres", "--", TRIGGER, *argv)
    assert result.rc == 2, result.stdout + result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout)["ok"] is False
    assert snapshot(host) == before


@pytest.fixture
def hostile_dumps(host):
    """What whoever writes the backup directory could leave there, all newer than the real dump."""
    names = {
        "hoge_db.outside.dump": "/var/lib/postgresql/outside.dump",
        "hoge_db.dangling.dump": "/var/backups/postgresql/nothing-here",
    }
    host.check_output("cp -p %s /var/lib/postgresql/outside.dump", DUMP)
    for link, target in names.items():
        host.check_output("ln -sfn %s %s", target, f"/var/backups/postgresql/{link}")
    host.check_output("cp -p %s %s", DUMP, f"{DUMP}.sha256")
    host.check_output("touch %s /var/lib/postgresql/outside.dump", f"{DUMP}.sha256")
    host.check_output("touch -d '1 hour ago' %s", DUMP)
    yield
    links = [f"/var/backups/postgresql/{link}" for link in names]
    host.check_output("rm -f %s %s %s /var/lib/postgresql/outside.dump", *links, f"{DUMP}.sha256")


def test_web_trigger_default_choice_skips_hostile_entries(host, hostile_dumps, dump_counts):
    """Newer links out of the directory, dangling links and checksum files are passed over: the job
    restores the real dump (again: the web trigger always restores)."""
    started, answer = app_restores(host)
    assert started["dump"] == "hoge_db.chinook.dump", started
    assert answer["state"] == "done" and answer["dump"] == "hoge_db.chinook.dump", answer
    assert counts(host, "hoge_db") == dump_counts


def test_web_trigger_never_runs_as_root(host):
    before = snapshot(host)
    result = host.run("%s hoge_db", TRIGGER)
    assert result.rc == 5, result.stdout + result.stderr
    assert result.stderr == ""
    assert "sudo -n -u postgres" in json.loads(result.stdout)["error"]
    assert snapshot(host) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["-u", "postgres", "psql", "-c", "SELECT 1"],
        [TRIGGER, "hoge_db"],  # the right command as root
        ["-u", "root", TRIGGER, "hoge_db"],
        ["/bin/sh", "-c", "id"],
        ["/usr/bin/systemctl", "restart", "postgresql"],
        ["-e", "/etc/pgops-restore.json"],
        ["-s"],
    ],
    ids=" ".join,
)
def test_app_user_may_run_nothing_else(host, argv):
    result = sudo_as(host, "webapp", *argv)
    assert result.rc == 1
    assert "a password is required" in result.stderr


def test_app_user_sudo_listing(host):
    out = host.check_output("COLUMNS=500 sudo -ll -U webapp")
    assert out.count("Sudoers entry:") == 1, out
    assert "RunAsUsers: postgres\n" in out
    listed = [line.strip() for line in out.split("Commands:\n", 1)[1].splitlines() if line.strip()]
    assert listed == [f"{TRIGGER} start hoge_db", f"{TRIGGER} status hoge_db"]


def test_web_trigger_files_belong_to_root_but_the_config(host):
    config = host.file(TRIGGER_CONFIG)
    assert (config.user, config.mode) == ("postgres", 0o600)
    etc = host.file("/etc")
    assert etc.user == "root" and not etc.mode & 0o022
    assert "login_password" not in host.check_output("cat %s", TRIGGER_CONFIG)  # peer authentication
    # the whole module_utils package, whatever files it is made of, root's and read-only to others
    for source in (REPO / "plugins" / "module_utils").glob("*.py"):
        assert host.file(f"{TRIGGER_LIB}/{source.name}").is_file, source.name
    writable = host.check_output(
        "find /usr/local/lib/pgops-dbrestore %s \\( ! -user root -o -perm /022 \\) -print", TRIGGER
    )
    assert writable == ""
    for package in ("", "/pgops", "/pgops/dbrestore", "/pgops/dbrestore/plugins"):
        assert host.file(f"/usr/local/lib/pgops-dbrestore/ansible_collections{package}/__init__.py").exists


def test_web_trigger_diff_prints_no_password(host):
    """A configuration change under --check --diff -v: reported as changed, its content not shown."""
    secret = "diff-secret-test-only"
    before = host.file(TRIGGER_CONFIG).sha256sum
    result = run_scenario_playbook(
        "web_trigger.yml",
        "--check", "--diff", "-v",
        "-e", json.dumps({"restore_web_trigger_connection": {"login_password": secret}}),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert re.search(r"TASK \[[^]]*Write its configuration[^\n]*\n+changed: ", result.stdout), result.stdout
    assert secret not in result.stdout
    assert "admin-test-only" not in result.stdout
    assert host.file(TRIGGER_CONFIG).sha256sum == before


# --- restart fallback -------------------------------------------------------------------------


def test_fallback_restarts_postgresql_through_sudo(host, web, dump_counts):
    """hoge_owner owns hoge_db (CREATEDB, no superuser, no pg_signal_backend) and cannot end the
    client's hoge_app session: the play, run as the OS user pgops, restarts PostgreSQL with
    `sudo -n systemctl restart postgresql` (no tty) and completes."""
    role = "SELECT rolsuper::text || rolcreatedb::text FROM pg_roles WHERE rolname = 'hoge_owner'"
    assert psql(host, "postgres", role) == "falsetrue"
    assert psql(host, "postgres", "SELECT pg_has_role('hoge_owner', 'pg_signal_backend', 'member')") == "f"
    owner = "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'hoge_db'"
    assert psql(host, "postgres", owner) == "hoge_owner"
    app = "SELECT count(*) FROM pg_stat_activity WHERE datname = 'hoge_db' AND usename = 'hoge_app'"
    sessions = psql(host, "postgres", app)
    assert int(sessions) >= 1

    main_pid = host.check_output("systemctl show -P MainPID postgresql@15-main")
    started = float(web.check_output("date +%s.%N"))
    # login_db: a maintenance database of its own (prepare.yml), where it may keep the collection's records
    connection = {"login_user": "hoge_owner", "login_password": "owner-test-only", "login_host": "127.0.0.1",
                  "login_db": "hoge_owner"}  # fmt: skip
    result = run_playbook(
        "restore",
        "-v",
        "-e", "db=hoge_db",
        "-e", "force=true",
        "-e", json.dumps({
            **{f"pgops_{option}": value for option, value in connection.items()},
            "restore_fallback": "restart",
            "restore_restart_sudo": True,
            "ansible_become": True,
            "ansible_become_user": "pgops",
        }),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert "restarted: true" in result.stdout
    assert "PostgreSQL was restarted" in result.stdout
    assert host.check_output("systemctl show -P MainPID postgresql@15-main") not in (main_pid, "0")
    assert counts(host, "hoge_db") == dump_counts
    assert recorded(host, "restored_by", login_db="hoge_owner") == "hoge_owner"
    # sudo logged the exact command, run by pgops
    journal = host.check_output("journalctl -q --no-pager -t sudo --since -10min")
    assert "pgops : " in journal
    assert "COMMAND=/usr/bin/systemctl restart postgresql" in journal
    # the client lost its session and came back
    assert any(r[0] > started and r[1] == "ok" for r in client_log(web))


# --- multi-database set -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def db2():
    return testinfra.get_host(f"podman://{DB2_HOST}")


def shard_reads(web, since):
    """The shard reader's requests since a time, as (time, status, generations)."""
    rows = []
    for line in web.check_output("cat %s", SHARD_LOG).splitlines():
        stamp, status, rest = [*line.split(" ", 2), "", ""][:3]
        if float(stamp) >= since:
            rows.append((float(stamp), status, rest))
    return rows


def last_read(web, since):
    return [(0.0, "", ""), *shard_reads(web, since)][-1][1:]


def wait_for(check, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def closed_shards(*hosts):
    query = "SELECT datname FROM pg_database WHERE datname LIKE 'shard_' AND NOT datallowconn"
    return [name for h in hosts for name in psql(h, "postgres", query).split()]


def test_set_with_a_broken_dump_switches_nothing(host, db2):
    before = snapshot(host)
    result = run_playbook("restore", *SET)
    assert result.returncode != 0
    assert "before any database was switched" in result.stdout
    assert snapshot(host) == before
    assert before[3] == {"shard1": "1", "shard2": "1", "shard3": "1"}
    assert not [d for d in before[0] + before[1] if "staging" in d or (d.startswith("shard") and "_prev_" in d)]


def test_set_with_db2_failing_during_the_switch_rolls_db1_back(host, db2, web):
    """db2's switch is held at its start (db1 has switched), and its staged copy of shard3 vanishes: it fails."""
    host.check_output("rm /var/backups/postgresql/shard2.broken.sql")  # shard2's good dump is the newest now
    paused = "/run/pgops-db2-paused"
    for h, pause in ((host, ""), (db2, f"export PGOPS_DBRESTORE_PAUSE_BEFORE=switch:{paused}")):
        h.check_output("printf '%%s\\n' '#!/bin/sh' %s 'exec /usr/bin/python3 \"$@\"' >/usr/local/bin/pgops-python "
                       "&& chmod 0755 /usr/local/bin/pgops-python", pause or ":")  # fmt: skip
    started = time.time()
    cmd = [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(SCENARIO_DIR / "inventory" / "hosts.yml"),
           *SET, "-e", "ansible_python_interpreter=/usr/local/bin/pgops-python", "pgops.dbrestore.restore"]  # fmt: skip
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_COLLECTIONS_PATH": str(REPO / ".cache" / "collections")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for(lambda: db2.run('ps -o stat= -p "$(cat %s)"', paused).stdout.startswith("T"), "db2 never paused")
        wait_for(lambda: len([d for d in databases(host) if d.startswith("shard") and "_prev_" in d]) == 2,
                 "db1 never switched")  # fmt: skip
        assert sorted(closed_shards(host, db2)) == ["shard1", "shard2", "shard3"]  # nobody reaches any shard
        psql(db2, "postgres", "DROP DATABASE shard3_pgops_staging")
        db2.check_output("kill -CONT $(cat %s)", paused)
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        db2.run("rm -f %s", paused)
    assert proc.returncode != 0 and "every database that had switched was rolled back" in out, out
    assert generations() == {"shard1": "1", "shard2": "1", "shard3": "1"} and not closed_shards(host, db2)
    wait_for(lambda: last_read(web, started) == ("ok", "1,1,1"), "the app never got its shards back", 30)
    reads = shard_reads(web, started)
    assert [r for r in reads if r[1] == "fail"] and not [r for r in reads if r[1] == "MIXED"]


def test_set_restores_every_shard_on_both_hosts(host, db2, web):
    started = time.time()
    result = run_playbook("restore", *SET)
    assert result.returncode == 0, result.stdout
    assert generations() == {"shard1": "2", "shard2": "2", "shard3": "2"} and not closed_shards(host, db2)
    report = re.sub(r"\s*\n\s+", " ", result.stdout)  # the report's folded lines, unfolded
    assert re.search(r"closed on every host from the first close to the last reopen \d+ ms", report), report
    wait_for(lambda: last_read(web, started) == ("ok", "2,2,2"), "the app never read the new shards", 30)
    reads = shard_reads(web, started)
    assert reads[0][1:] == ("ok", "1,1,1") and not [r for r in reads if r[1] == "MIXED"], reads
