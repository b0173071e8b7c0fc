"""The web_host role keeps prefork app servers serving through a database restore.

Each test restores hoge_db on db1 with playbooks/restore.yml while web1 requests the test app
(tests/app) every 15 ms, then reads what every request got. The tests run in file order:
unicorn with the role's hooks (the converged state), puma in cluster mode, then a control run
of unicorn without the hooks, which shows the errors the hooks prevent.
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


def get(host):
    return host.run("curl -sS -m 20 %s", URL)


def wait_serving(host, workers=4, timeout=60):
    """Until the app answers ok from `workers` different worker processes."""
    seen = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = OK.match(get(host).stdout.strip())
        if m:
            seen.add(m.group(1))
            if len(seen) >= workers:
                return
        time.sleep(0.05)
    pytest.fail(f"the app did not answer from {workers} workers within {timeout}s (saw {seen})")


def start_loop(host):
    """Start the request loop on web1 (15 ms apart); it stops when LOOP_STOP exists."""
    host.run("rm -f %s %s", LOOP_OUT, LOOP_STOP)
    cmd = ["podman", "exec", WEB, "/usr/local/bin/request_loop.py", URL, LOOP_OUT, LOOP_STOP, "0.015"]
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


def restore_under_load(host, label):
    """Restore hoge_db while the loop runs; returns a summary of what the requests got."""
    psql("CREATE TABLE IF NOT EXISTS public.pgops_probe ()")
    wait_serving(host)
    old_oid = psql("SELECT oid FROM pg_database WHERE datname = 'hoge_db'").strip()
    first = OK.match(get(host).stdout.strip())
    assert first and first.group(3) == old_oid and first.group(4) == "t", first

    loop = start_loop(host)
    try:
        time.sleep(1.5)
        started = time.monotonic()
        res = playbook(REPO / "playbooks" / "restore.yml", "-v", "-e", "db=hoge_db", "-e", "force=true")
        restore_s = time.monotonic() - started
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr
        time.sleep(2)
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
    for mode in ("multi", "octopus"):
        for server in ("unicorn", "puma"):
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
    apply_role(web_host_server="unicorn", web_host_hooks=True)  # the converged state (no-op)
    s = restore_under_load(host, "unicorn+hooks")
    assert s["failed_after_window"] == 0, s
    assert s["last_requests_new_copy"], s
    # workers that served the old copy served the restored one, without a restart
    assert s["new_copy_from_old_workers"] > 0, s
    assert s["reloaded_by_playbook"], s


def test_puma_cluster_with_hooks_survives_restore(host):
    apply_role(web_host_server="puma")
    assert "puma" in host.check_output("systemctl show -P ExecStart app")
    s = restore_under_load(host, "puma+hooks")
    assert s["failed_after_window"] == 0, s
    assert s["last_requests_new_copy"], s
    assert s["new_copy_from_old_workers"] > 0, s


BASE = URL.rstrip("/")
COOKIES = "/tmp/button.cookies"


def browser(host, *args):
    """curl as a browser would: the cookie jar, no redirect followed; returns 'code location' and the body."""
    out = host.run("curl -sS -m 30 -b %s -c %s -o /tmp/button.body -w '%%{http_code} %%{redirect_url}' "
                   + " ".join(["%s"] * len(args)), COOKIES, COOKIES, *args)  # fmt: skip
    assert out.rc == 0, out.stderr
    return out.stdout.strip(), host.file("/tmp/button.body").content_string


def test_restore_button_keeps_the_user_signed_in(host, tmp_path):
    """Sign in (a session row in hoge_db), press the restore button, follow the progress page until it
    redirects: still signed in, the data is the dump's, and the parallel request loop saw no failure."""
    apply_role(web_host_server="unicorn", web_host_hooks=True)
    psql("CREATE TABLE IF NOT EXISTS sessions (id bigserial PRIMARY KEY, session_id varchar NOT NULL UNIQUE,"
         " data text); GRANT SELECT, INSERT, UPDATE, DELETE ON sessions TO hoge_app;"
         " GRANT USAGE ON SEQUENCE sessions_id_seq TO hoge_app;"
         " DROP TABLE IF EXISTS public.pgops_probe")  # fmt: skip
    podman(DB, "runuser", "-u", "postgres", "--", "pg_dump", "-Fc", "-f", "/tmp/hoge_db.button.dump", "hoge_db")
    subprocess.run(["podman", "cp", f"{DB}:/tmp/hoge_db.button.dump", str(tmp_path / "dump")], check=True)
    subprocess.run(["podman", "cp", str(tmp_path / "dump"), f"{WEB}:/var/backups/pgops-app/hoge_db.button.dump"],
                   check=True)  # fmt: skip
    host.check_output("chmod 0644 /var/backups/pgops-app/hoge_db.button.dump")
    res = playbook(SCENARIO_DIR / "web_trigger.yml")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr
    wait_serving(host)

    host.run("rm -f %s", COOKIES)
    assert browser(host, "-d", "user=admin", f"{BASE}/login")[0] == f"303 {BASE}/whoami"
    assert browser(host, f"{BASE}/whoami")[1] == "user=admin\n"  # signed in after the dump was made
    psql("CREATE TABLE public.pgops_probe ()")  # the app changed its data since the dump

    loop = start_loop(host)
    try:
        time.sleep(1.5)
        pressed = browser(host, "-H", f"Origin: {BASE}", "-d", "", f"{BASE}/pgops/restore")
        assert pressed[0] == f"303 {BASE}/pgops/restore/progress", pressed
        pages, deadline = 0, time.monotonic() + 300
        while True:  # the progress page reloads itself every second until the restore is done
            page = browser(host, f"{BASE}/pgops/restore/progress")
            if page[0].startswith("303"):
                break
            assert page[0].startswith("200") and 'http-equiv="refresh"' in page[1], page
            assert time.monotonic() < deadline, page
            pages += 1
            time.sleep(1)
        assert page[0] == f"303 {BASE}/whoami", page
        time.sleep(2)
    finally:
        host.run("touch %s", LOOP_STOP)
        loop.wait(timeout=60)

    assert browser(host, f"{BASE}/whoami")[1] == "user=admin\n"  # still signed in
    status = json.loads(browser(host, f"{BASE}/pgops/restore/status")[1])
    assert status["state"] == "done" and status["outcome"]["changed"] is True, status
    assert psql("SELECT to_regclass('public.pgops_probe') IS NULL").strip() == "t"  # the dump's data
    reqs = []
    for line in host.file(LOOP_OUT).content_string.splitlines():
        start, end, code, body = line.split("\t", 3)
        reqs.append(Request(float(start), float(end), int(code), body))
    failed = [r for r in reqs if not r.ok]
    summary = {"run": "restore button", "requests": len(reqs), "progress_pages": pages, "failed": len(failed),
               "errors": sorted({re.sub(r"pid=\d+ ", "", r.body)[:160] for r in failed})[:5],
               "last_requests_new_copy": all(r.ok and r.field(4) == "f" for r in reqs[-20:])}  # fmt: skip
    print(json.dumps(summary, indent=2))
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    report["restore button"] = summary
    REPORT.write_text(json.dumps(report, indent=2))
    assert len(reqs) > 100 and summary["last_requests_new_copy"], summary
    assert failed == [], summary


def test_control_unicorn_without_hooks_fails(host):
    """Without the hooks and the middleware the same restore breaks requests until the reload."""
    apply_role(web_host_server="unicorn", web_host_hooks=False)
    assert "pgops_hooks" not in host.file("/etc/app/unicorn.rb").content_string
    s = restore_under_load(host, "unicorn control (no hooks)")
    assert s["failed_after_window"] > 0, s
    assert any("terminating connection" in e or "no connection" in e or "closed" in e for e in s["errors"]), s
    # the playbook's reload still brings it back in the end
    assert s["last_requests_new_copy"], s
