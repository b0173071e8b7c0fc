"""The web_host role keeps prefork app servers serving through a database restore.

Each test restores hoge_db on db1 with playbooks/restore.yml while web1 requests the test app
(tests/app) every 15 ms, then reads what every request got. The tests run in file order:
unicorn with the role's hooks (the converged state), puma in cluster mode, the restore button
under both servers at once with signed-in load (test_restore_button_under_load_on_unicorn_and_puma),
then a control run of unicorn without the hooks, which shows the errors the hooks prevent.
"""

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

WEB = "pgops-web-web1"
DB = "pgops-web-db1"
SCENARIO_DIR = Path(__file__).resolve().parent.parent
REPO = SCENARIO_DIR.parents[2]
INVENTORY = SCENARIO_DIR / "inventory" / "hosts.yml"
URL = "http://127.0.0.1:8080/"
PUMA = "http://127.0.0.1:8081"  # the same app under puma: a second unit, app-puma
TIMEOUT_S = 6  # unicorn's timeout (inventory/group_vars/web.yml) and puma's worker_timeout (above 5 at least)
PUMA_UNIT = {"web_host_service": "app-puma", "web_host_user": "app", "web_host_app_dir": "/srv/app",
             "web_host_server": "puma", "web_host_workers": 2, "web_host_listen": "127.0.0.1:8081",
             "web_host_timeout": TIMEOUT_S}  # fmt: skip
LOOP_OUT = "/tmp/request_loop.tsv"
LOOP_STOP = "/tmp/request_loop.stop"
REPORT = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/tmp")) / "web_host_report.json"
OK = re.compile(r"^ok pid=(\d+) ppid=(\d+) oid=(\d+) probe=([tf]) rows=(\d+)$")


def podman(container, *argv, check=True):
    cmd = ["podman", "exec", container, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def psql(sql):
    return podman(DB, "runuser", "-u", "postgres", "--", "psql", "-X", "-qAt", "-d", "hoge_db", "-c", sql).stdout


def playbook(path, *extra):
    """Run a playbook against the scenario's containers; returns the CompletedProcess."""
    cmd = [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(INVENTORY), *extra, str(path)]
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)


def apply_role(**settings):
    res = playbook(SCENARIO_DIR / "apply.yml", "-e", json.dumps(settings))
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def get(host, url=URL):
    return host.run("curl -sS -m 20 %s", url)


def wait_serving(host, workers=4, timeout=60, url=URL):
    """Until the app answers ok from `workers` different worker processes."""
    seen = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = OK.match(get(host, url).stdout.strip())
        if m:
            seen.add(m.group(1))
            if len(seen) >= workers:
                return
        time.sleep(0.05)
    pytest.fail(f"the app did not answer from {workers} workers within {timeout}s (saw {seen})")


def start_loop(host, url=URL):
    """Start the request loop on web1 (15 ms apart); it stops when LOOP_STOP exists."""
    host.run("rm -f %s %s", LOOP_OUT, LOOP_STOP)
    cmd = ["podman", "exec", WEB, "/usr/local/bin/request_loop.py", url, LOOP_OUT, LOOP_STOP, "0.015"]
    return subprocess.Popen(cmd)


@dataclass
class Request:
    start: float
    end: float
    status: int
    body: str

    @property
    def ok(self):
        return self.status == 200 and OK.match(self.body) is not None

    def field(self, n):
        return OK.match(self.body).group(n)


def restore_under_load(host, label, url=URL, workers=4, service="app"):
    """Restore hoge_db while the loop runs; returns a summary of what the requests got."""
    psql("CREATE TABLE IF NOT EXISTS public.pgops_probe ()")
    wait_serving(host, workers, url=url)
    old_oid = psql("SELECT oid FROM pg_database WHERE datname = 'hoge_db'").strip()
    first = OK.match(get(host, url).stdout.strip())
    assert first and first.group(3) == old_oid and first.group(4) == "t", first

    loop = start_loop(host, url)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        res = playbook(REPO / "playbooks" / "restore.yml", "-v", "-e", "db=hoge_db", "-e", "force=true",
                       "-e", f"web_host_service={service}")  # fmt: skip
        restore_s = time.monotonic() - started
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr
        time.sleep(1)
    finally:
        host.run("touch %s", LOOP_STOP)
        loop.wait(timeout=60)

    new_oid = psql("SELECT oid FROM pg_database WHERE datname = 'hoge_db'").strip()
    assert new_oid != old_oid
    assert psql("SELECT to_regclass('public.pgops_probe') IS NULL").strip() == "t"

    # -v prints each changed result: the restore's switch window, and whether web_reload.yml reloaded web1
    # (the dry run prints 0 first)
    windows = [int(w) for w in re.findall(r"switch_window_ms\W+(\d+)", res.stdout)]
    window_ms = max(windows) if windows else None
    reloaded = re.search(r"TASK \[[^]]*Reload the app server so[^\n]*\n+changed: \[" + WEB, res.stdout) is not None
    assert window_ms is not None, "no restore result in the playbook output"

    reqs = []
    for line in host.file(LOOP_OUT).content_string.splitlines():
        start, end, status, body = line.split("\t", 3)
        reqs.append(Request(float(start), float(end), int(status), body))
    assert len(reqs) > 100

    # The switch as the app saw it: the first request that did not simply get the old copy
    # (it failed, waited, or got the new copy); the window is switch_window_ms from there.
    changed = [r for r in reqs if not (r.ok and r.field(3) == old_oid)]
    assert changed, "no request saw the restore"
    w0 = changed[0].start
    w1 = w0 + window_ms / 1000
    failed = [r for r in reqs if not r.ok]
    after = [r for r in failed if r.start > w1]
    new = [r for r in reqs if r.ok and r.field(3) == new_oid]
    old_workers = {r.field(1) for r in reqs if r.ok and r.field(3) == old_oid}
    summary = {
        "run": label,
        "requests": len(reqs),
        "restore_playbook_s": round(restore_s, 1),
        "switch_window_ms": window_ms,
        "failed": len(failed),
        "failed_after_window": len(after),
        "failed_span_ms": round((failed[-1].end - failed[0].start) * 1000) if failed else 0,
        "max_latency_ms": round(max(r.end - r.start for r in reqs) * 1000),
        "max_latency_near_switch_ms": round(max(r.end - r.start for r in reqs if abs(r.start - w0) < 2) * 1000),
        "first_new_copy_after_ms": round((new[0].end - w0) * 1000) if new else None,
        "new_copy_from_old_workers": len([r for r in new if r.field(1) in old_workers]),
        "last_requests_new_copy": all(r.ok and r.field(3) == new_oid and r.field(4) == "f" for r in reqs[-20:]),
        "reloaded_by_playbook": reloaded,
        "errors": sorted({re.sub(r"pid=\d+ ", "", r.body)[:160] for r in failed})[:5],
    }
    print(json.dumps(summary, indent=2))
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    report[label] = summary
    REPORT.write_text(json.dumps(report, indent=2))
    return summary


def test_unit_and_config(host):
    assert host.service("app").is_running
    assert host.service("app").is_enabled
    unit = host.file("/etc/systemd/system/app.service").content_string
    assert "ExecReload=/usr/local/sbin/pgops-web-reload unicorn" in unit
    assert host.run("ruby -c /etc/app/unicorn.rb /etc/app/unicorn.d/pgops_hooks.rb /etc/app/pgops_db.rb").rc == 0
    wait_serving(host)


# DATABASE_URL's password (inventory/group_vars/all.yml): it must reach the app, and nobody else.
SECRET = "app-test-only"


def test_environment_is_root_only(host):
    """The unit names a root-only EnvironmentFile; no file another user can read holds the secret."""
    unit = host.file("/etc/systemd/system/app.service")
    assert unit.mode == 0o644
    assert "EnvironmentFile=/etc/app/app.env\n" in unit.content_string
    assert SECRET not in unit.content_string
    env = host.file("/etc/app/app.env")
    assert (env.user, env.group, env.mode) == ("root", "root", 0o600)
    assert f'DATABASE_URL="postgres://hoge_app:{SECRET}@pgops-web-db1/hoge_db"\n' in env.content_string
    # what any local user can read: files anywhere (the unit's EnvironmentFile= line is the
    # control: the search does read what nobody may read), and the unit's properties over D-Bus
    found = host.run(
        "runuser -u nobody -- grep -rlsF -e %s -e %s /etc /srv /run /var /usr /tmp /home /opt /root",
        SECRET,
        "EnvironmentFile=/etc/app/app.env",
    )
    assert found.stdout.splitlines() == ["/etc/systemd/system/app.service"], found.stdout
    shown = host.run("runuser -u nobody -- systemctl show app")
    assert shown.rc == 0 and "EnvironmentFiles=/etc/app/app.env" in shown.stdout
    assert SECRET not in shown.stdout
    # ... while the app server got its environment (read as the app user: root in the container
    # may not read another user's /proc/<pid>/environ)
    master = host.check_output("systemctl show -P MainPID app")
    environ = host.check_output("runuser -u app -- cat /proc/%s/environ", master).split("\0")
    assert f"DATABASE_URL=postgres://hoge_app:{SECRET}@pgops-web-db1/hoge_db" in environ
    assert "APP_TABLE=public.artist" in environ
    assert "APP_QUOTING_CHECK=a \"b\" $HOME `id` c\\d # e 'f'" in environ
    assert host.user("app").uid == int(host.check_output("stat -c %%u /proc/%s", master))
    wait_serving(host)


def test_diff_and_verbose_runs_print_no_secret(host):
    """A changed secret under --check --diff -v: the environment file changes, its content is not shown."""
    other = "diff-secret-test-only"
    env = {"DATABASE_URL": f"postgres://hoge_app:{other}@pgops-web-db1/hoge_db", "APP_TABLE": "public.artist"}
    before = host.file("/etc/app/app.env").sha256sum
    res = playbook(
        SCENARIO_DIR / "apply.yml", "--check", "--diff", "-v", "-e", json.dumps({"web_host_environment": env})
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"TASK \[[^]]*Write the app server's environment file[^\n]*\n+changed: ", res.stdout), res.stdout
    assert other not in res.stdout + res.stderr
    assert SECRET not in res.stdout + res.stderr
    assert host.file("/etc/app/app.env").sha256sum == before


def test_reload_is_zero_downtime(host):
    """systemctl reload re-execs unicorn (new master) without a failed request."""
    master = host.check_output("systemctl show -P MainPID app")
    loop = start_loop(host)
    try:
        time.sleep(1)
        assert host.run("systemctl reload app").rc == 0
        time.sleep(1)
    finally:
        host.run("touch %s", LOOP_STOP)
        loop.wait(timeout=60)
    assert host.check_output("systemctl show -P MainPID app") != master
    assert host.service("app").is_running
    lines = host.file(LOOP_OUT).content_string.splitlines()
    bad = [line for line in lines if "\t200\tok " not in line]
    assert len(lines) > 50 and not bad, bad[:5]


def test_other_modes_render_and_parse(host):
    """The multi-database and Octopus variants (Octopus cannot be installed here) render and parse."""
    res = playbook(SCENARIO_DIR / "render.yml", "--tags", "config")
    assert res.returncode == 0, res.stdout + res.stderr
    # each template in each mode and for each server (the other pairs differ in comments only)
    for mode, server in (("multi", "unicorn"), ("octopus", "puma")):
        d = f"/etc/{mode}-{server}"
        res = host.run(f"ruby -c {d}/pgops_db.rb {d}/{server}.d/pgops_hooks.rb {d}/{server}.rb")
        assert res.rc == 0, res.stdout + res.stderr
        lib = host.file(f"{d}/pgops_db.rb").content_string
        if mode == "octopus":
            assert "connection_proxy.instance_variable_get(:@shards)" in lib
            assert "clear_reloadable_connections!" in lib and "disconnect!" in lib
        else:
            assert "clear_all_connections!" in lib and "connection_pool_list" in lib
    assert not host.file("/etc/systemd/system/multi-unicorn.service").exists


def test_unicorn_with_hooks_survives_restore(host):
    # the converged state (unicorn with the hooks): the tests before changed nothing of it
    assert "pgops_hooks" in host.file("/etc/app/unicorn.rb").content_string
    s = restore_under_load(host, "unicorn+hooks")
    assert s["failed_after_window"] == 0, s
    assert s["last_requests_new_copy"], s
    # workers that served the old copy served the restored one, without a restart
    assert s["new_copy_from_old_workers"] > 0, s
    assert s["reloaded_by_playbook"], s


def test_puma_cluster_with_hooks_survives_restore(host):
    """The same app under puma, a second unit (app-puma, port 8081) beside unicorn's; the playbook reloads it.

    Its request timeout (worker_timeout) is the button test's, which uses both servers."""
    apply_role(**PUMA_UNIT)
    assert "puma" in host.check_output("systemctl show -P ExecStart app-puma")
    s = restore_under_load(host, "puma+hooks", url=f"{PUMA}/", workers=2, service="app-puma")
    assert s["failed_after_window"] == 0, s
    assert s["last_requests_new_copy"], s
    assert s["new_copy_from_old_workers"] > 0, s


BASE = URL.rstrip("/")
COOKIES = "/tmp/button.cookies"
TRIGGER = ["/usr/local/sbin/pgops-restore"]
APP_SUDO = ["runuser", "-u", "app", "--", "sudo", "-n", "-u", "pgopsrun", *TRIGGER]
AS_RUNAS = ["runuser", "-u", "pgopsrun", "--", *TRIGGER]
LOAD_OUT = "/tmp/load_client.tsv"
LOAD_STOP = "/tmp/load_client.stop"


def browser(host, *args):
    """curl as a browser would: the cookie jar, no redirect followed; returns 'code location', the body and
    the pid of the worker process that answered (the test app's x-app-pid header)."""
    fmt = "%{http_code} %{redirect_url}|%header{x-app-pid}"
    out = host.run("curl -sS -m 30 -b %s -c %s -o /tmp/button.body -w %s " + " ".join(["%s"] * len(args)),
                   COOKIES, COOKIES, fmt, *args)  # fmt: skip
    assert out.rc == 0, out.stderr
    answer, pid = out.stdout.strip().split("|")
    return answer.strip(), host.file("/tmp/button.body").content_string, pid


def trigger(*argv):
    """pgops-restore (through the app's sudo rule, or as its run-as user): (exit code, the JSON answer or None)."""
    res = podman(WEB, *argv, check=False)
    try:
        return res.returncode, json.loads(res.stdout.splitlines()[-1])
    except (ValueError, IndexError):
        return res.returncode, None


def follow_progress(host, base, deadline_s=300):
    """Reload the progress page (as its meta refresh does, every second) until it redirects; the pages seen."""
    pages, deadline = 0, time.monotonic() + deadline_s
    while True:
        page = browser(host, f"{base}/pgops/restore/progress")
        if page[0].startswith("303"):
            assert page[0] == f"303 {base}/whoami", page
            return pages
        assert page[0].startswith("200") and 'http-equiv="refresh"' in page[1], page
        assert time.monotonic() < deadline, page
        pages += 1
        time.sleep(1)


def kill_idle_worker(host, pid, port):
    """SIGKILL a worker between requests: stopped, it accepts nothing; killed once it holds no client connection
    (a connection it held would fail for the test's killing, not for the restore)."""
    script = (f"kill -STOP {pid}; sleep 0.05; "
              f"if ss -Htnp state established '( sport = :{port} )' | grep -q 'pid={pid},'; "
              f"then kill -CONT {pid}; exit 1; else kill -KILL {pid}; fi")  # fmt: skip
    deadline = time.monotonic() + 30
    while host.run("sh -c %s", script).rc != 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    while host.run("kill -0 %s", pid).rc == 0:  # until the master has reaped it
        assert time.monotonic() < deadline
        time.sleep(0.05)


def load_results(host):
    """The load client's requests: (server, user, path, start, end, status, pid, body) tuples (none before the
    client has made its file)."""
    rows = []
    out = host.file(LOAD_OUT)
    for line in out.content_string.splitlines() if out.exists else []:
        base, user, path, start, end, code, pid, body = line.split("\t", 7)
        rows.append((base, user, path, float(start), float(end), int(code), pid, body))
    return rows


def good(row):
    _base, user, path, _start, _end, code, _pid, body = row
    if path == "/login":
        return code == 303
    if path == "/whoami":
        return code == 200 and body == f"user={user}"
    return code == 200 and OK.match(body) is not None


def test_restore_button_under_load_on_unicorn_and_puma(host):
    """The restore button on unicorn and puma (timeouts 6 s) under signed-in load on both, with the refusals.

    The browser signs in on unicorn, the app changes data, the button starts the restore (its dump, from
    prepare, restores for longer than the servers' timeout) and the worker that started it is killed; the
    progress page follows it to the end: still signed in, the dump's data. The app changes data again and
    the button on puma restores the same dump again. Signed-in clients on both servers, several threads
    each, request the database all along: not one request fails.
    """
    assert "pgops_hooks" in host.file("/etc/app/unicorn.rb").content_string  # the converged unicorn
    if host.run("systemctl is-active app-puma").rc != 0:  # the puma test's unit; alone, this test starts it
        apply_role(**PUMA_UNIT)
    try:
        button_under_load(host)
    finally:
        host.run("touch %s", LOAD_STOP)
        host.run("systemctl disable --now app-puma")


def button_under_load(host):
    assert f"\ntimeout {TIMEOUT_S}\n" in host.file("/etc/app/unicorn.rb").content_string
    assert f"\nworker_timeout {TIMEOUT_S}\n" in host.file("/etc/app-puma/puma.rb").content_string
    assert "puma" in host.check_output("systemctl show -P ExecStart app-puma")
    psql("CREATE TABLE IF NOT EXISTS sessions (id bigserial PRIMARY KEY, session_id varchar NOT NULL UNIQUE,"
         " data text); GRANT SELECT, INSERT, UPDATE, DELETE ON sessions TO hoge_app;"
         " GRANT USAGE ON SEQUENCE sessions_id_seq TO hoge_app;"
         " DROP TABLE IF EXISTS public.pgops_probe")  # fmt: skip
    # a newer link out of the backup directory, which no start may take
    host.check_output("ln -sfn /etc/passwd /var/backups/pgops-app/hoge_db.zz-outside.dump")
    res = playbook(SCENARIO_DIR / "web_trigger.yml")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr
    wait_serving(host)
    wait_serving(host, workers=2, url=f"{PUMA}/")

    # refusals: each its JSON error and exit code, nothing changed
    oid = psql("SELECT oid FROM pg_database WHERE datname = 'hoge_db'").strip()
    before = trigger(*APP_SUDO, "status", "hoge_db")
    for argv, code in (
        ([*AS_RUNAS, "start", "other_db"], 2),
        ([*AS_RUNAS, "start", "hoge_db", "--force"], 2),
        ([*AS_RUNAS, "--config=/tmp/x", "start", "hoge_db"], 2),
        ([*AS_RUNAS, "start", "hoge_db", "hoge_db.zz-outside.dump"], 2),
    ):
        got = trigger(*argv)
        assert got[0] == code and got[1]["ok"] is False and got[1]["error"], (argv, got)
    assert trigger(*APP_SUDO, "start", "other_db")[0] == 1  # sudo's own refusal: not the app's to run
    assert trigger(*APP_SUDO, "status", "hoge_db") == before
    assert psql("SELECT oid FROM pg_database WHERE datname = 'hoge_db'").strip() == oid

    host.run("rm -f %s %s", COOKIES, LOAD_OUT)
    assert browser(host, "-d", "user=admin", f"{BASE}/login")[0] == f"303 {BASE}/whoami"
    assert browser(host, f"{BASE}/whoami")[1] == "user=admin\n"  # signed in after the dump was made
    psql("CREATE TABLE public.pgops_probe ()")  # the app changed its data since the dump

    host.run("rm -f %s", LOAD_STOP)
    load = subprocess.Popen(["podman", "exec", WEB, "/usr/local/bin/load_client.py", LOAD_OUT, LOAD_STOP,
                             "3", "0.02", BASE, PUMA])  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len([r for r in load_results(host) if r[2] != "/login"]) < 30:  # every user signed in and served
            assert time.monotonic() < deadline and load.poll() is None
            time.sleep(0.1)

        # 1. unicorn: press, a second start is busy, the worker that started it is killed, the page follows it
        pressed = browser(host, "-H", f"Origin: {BASE}", "-d", "", f"{BASE}/pgops/restore")
        assert pressed[0] == f"303 {BASE}/pgops/restore/progress", pressed
        worker = pressed[2]
        master = host.check_output("systemctl show -P MainPID app")
        assert host.check_output("ps -o ppid= -p %s", worker).strip() == master  # one of unicorn's workers
        code, busy = trigger(*APP_SUDO, "start", "hoge_db")
        first = trigger(*APP_SUDO, "status", "hoge_db")[1]
        assert code == 4 and busy["ok"] is False and busy["running"]["job"] == first["job"], busy
        assert first["dump"] == "hoge_db.button.dump" and first["state"] in ("queued", "running"), first
        kill_window = [float(host.check_output("date +%s.%N"))]
        kill_idle_worker(host, worker, 8080)
        kill_window.append(float(host.check_output("date +%s.%N")))
        assert trigger(*APP_SUDO, "status", "hoge_db")[1]["state"] in ("queued", "running", "switching")
        pages = follow_progress(host, BASE)
        assert browser(host, f"{BASE}/whoami")[1] == "user=admin\n"  # still signed in
        first = json.loads(browser(host, f"{BASE}/pgops/restore/status")[1])
        assert first["state"] == "done" and first["outcome"]["changed"] is True, first
        assert first["finished_at"] - first["started_at"] > TIMEOUT_S, first  # outlasted the request timeout
        assert psql("SELECT to_regclass('public.pgops_probe') IS NULL").strip() == "t"  # the dump's data
        rows = int(psql("SELECT count(*) FROM public.pgops_bulk"))

        # 2. the app changes data again; the button on puma restores the same dump again
        psql("CREATE TABLE public.pgops_probe ()")
        again = browser(host, "-H", f"Origin: {PUMA}", "-d", "", f"{PUMA}/pgops/restore")
        assert again[0] == f"303 {PUMA}/pgops/restore/progress", again
        pages += follow_progress(host, PUMA)
        assert browser(host, f"{PUMA}/whoami")[1] == "user=admin\n"
        second = json.loads(browser(host, f"{PUMA}/pgops/restore/status")[1])
        assert second["state"] == "done" and second["outcome"]["changed"] is True, second
        assert second["job"] != first["job"] and second["dump"] == first["dump"], second
        assert psql("SELECT to_regclass('public.pgops_probe') IS NULL").strip() == "t"
        assert int(psql("SELECT count(*) FROM public.pgops_bulk")) == rows
    finally:
        host.run("touch %s", LOAD_STOP)
        load.wait(timeout=60)

    reqs = load_results(host)
    failed = [r for r in reqs if not good(r)]
    # the one request the killed worker may have been serving as it was killed (it is stopped, and killed
    # only once it holds no connection, but a connection it accepts as the stop lands can slip through)
    by_kill = [r for r in failed if r[0] == BASE and r[5] == 0 and r[3] <= kill_window[1] and r[4] >= kill_window[0]]
    failed = [r for r in failed if r not in by_kill]
    by_server = {b: [r for r in reqs if r[0] == b and r[2] != "/login"] for b in (BASE, PUMA)}
    summary = {
        "run": "restore button under load", "requests": {b: len(r) for b, r in by_server.items()},
        "progress_pages": pages, "failed": len(failed), "killed_worker": worker, "lost_with_the_worker": len(by_kill),
        "restore_s": [round(j["finished_at"] - j["started_at"], 1) for j in (first, second)],
        "switch_window_ms": [j["outcome"]["switch_window_ms"] for j in (first, second)],
        "max_latency_ms": round(max(r[4] - r[3] for r in reqs) * 1000),
        "errors": sorted({f"{r[0]} {r[2]} {r[5]} {r[7][:120]}" for r in failed})[:5],
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    report["restore button"] = summary
    REPORT.write_text(json.dumps(report, indent=2))
    assert failed == [] and len(by_kill) <= 1, summary
    for base, served in by_server.items():
        # both servers, all along: from before the first restore began to after the second ended
        assert len({r[1] for r in served}) == 3, (base, summary)
        assert min(r[3] for r in served) < first["queued_at"], (base, summary)
        assert max(r[4] for r in served) > second["finished_at"], (base, summary)
        assert len([r for r in served if r[2] == "/" and r[7].split()[3] != f"oid={oid}"]) > 10, (base, summary)


def test_control_unicorn_without_hooks_fails(host):
    """Without the hooks and the middleware the same restore breaks requests until the reload."""
    apply_role(web_host_server="unicorn", web_host_hooks=False)
    assert "pgops_hooks" not in host.file("/etc/app/unicorn.rb").content_string
    s = restore_under_load(host, "unicorn control (no hooks)")
    assert s["failed_after_window"] > 0, s
    assert any("terminating connection" in e or "no connection" in e or "closed" in e for e in s["errors"]), s
    # the playbook's reload still brings it back in the end
    assert s["last_requests_new_copy"], s
