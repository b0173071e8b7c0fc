#!/usr/bin/env python3
"""Signed-in users of the test app, several at once, until STOP exists; one TSV line per request.

    load_client.py OUT STOP THREADS INTERVAL BASE_URL [BASE_URL...]

For each BASE_URL (one per app server) THREADS threads each sign in as their own user
(POST /login, the session row is in the database), then request GET / (reads the app's table)
and GET /whoami (reads the session row) in turn, INTERVAL seconds apart, until STOP exists.
Columns: base URL, user, path, start and end (UNIX time, seconds), HTTP status (0: no answer),
worker pid (x-app-pid), first line of the body. A request is good when its status is 200 and
its body is "ok ..." for / and "user=<its user>" for /whoami; the reader decides.
"""

from __future__ import annotations

import http.client
import os
import sys
import threading
import time
import urllib.parse


def request(base: str, method: str, path: str, cookie: str = "", body: str = "") -> tuple[int, str, str, str]:
    """(status, worker pid, body's first line, set-cookie) of one request on a new connection."""
    parts = urllib.parse.urlsplit(base)
    headers = {"Cookie": cookie} if cookie else {}
    if body:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
        out = resp.status, resp.getheader("x-app-pid", ""), text, resp.getheader("set-cookie", "")
        conn.close()
    except OSError as exc:
        out = 0, "", f"{type(exc).__name__}: {exc}", ""
    return out[0], out[1], (out[2].splitlines() or [""])[0].replace("\t", " "), out[3]


def user_loop(base: str, user: str, stop: str, interval: float, write) -> None:
    start = time.time()
    status, pid, line, cookie = request(base, "POST", "/login", body=f"user={user}")
    write(base, user, "/login", start, time.time(), status, pid, line)
    cookie = cookie.split(";", 1)[0]
    paths = ("/", "/whoami")
    n = 0
    while not os.path.exists(stop):
        path = paths[n % 2]
        n += 1
        start = time.time()
        status, pid, line, _cookie = request(base, "GET", path, cookie)
        write(base, user, path, start, time.time(), status, pid, line)
        time.sleep(max(0.0, interval - (time.time() - start)))


def main() -> None:
    out, stop, threads, interval, *bases = sys.argv[1:]
    lock = threading.Lock()
    with open(out, "w", buffering=1, encoding="utf-8") as fh:

        def write(*fields: object) -> None:
            base, user, path, start, end, status, pid, line = fields
            with lock:
                fh.write(f"{base}\t{user}\t{path}\t{start:.6f}\t{end:.6f}\t{status}\t{pid}\t{line}\n")

        workers = [
            threading.Thread(target=user_loop, args=(base, f"load{b}x{i}", stop, float(interval), write))
            for b, base in enumerate(bases)
            for i in range(int(threads))
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()


if __name__ == "__main__":
    main()
