#!/usr/bin/env python3
"""Request the test app every INTERVAL seconds until STOP exists; one TSV line per request.

    request_loop.py URL OUT STOP [INTERVAL]

Columns: start and end (UNIX time, seconds), HTTP status (0: no answer), first line of the body.
"""

import http.client
import os
import sys
import time
import urllib.parse


def main() -> None:
    url, out, stop = sys.argv[1:4]
    interval = float(sys.argv[4]) if len(sys.argv) > 4 else 0.015
    parts = urllib.parse.urlsplit(url)
    with open(out, "w", buffering=1, encoding="utf-8") as fh:
        while not os.path.exists(stop):
            start = time.time()
            try:
                conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
                conn.request("GET", parts.path or "/")
                resp = conn.getresponse()
                status, body = resp.status, resp.read().decode("utf-8", "replace")
                conn.close()
            except OSError as exc:
                status, body = 0, f"{type(exc).__name__}: {exc}"
            end = time.time()
            line = (body.splitlines() or [""])[0].replace("\t", " ")
            fh.write(f"{start:.6f}\t{end:.6f}\t{status}\t{line}\n")
            time.sleep(max(0.0, interval - (time.time() - start)))


if __name__ == "__main__":
    main()
