#!/usr/bin/python3
"""Stand-in for an app: one connection, a query every 0.2 s, reconnect when it breaks.

Appends "<unix time> ok <invoice_line rows> <artist rows> <backend pid>" or
"<unix time> fail <error>" to the log given as the only argument (libpq PG* variables).
"""

import sys
import time

import psycopg

QUERY = "SELECT (SELECT count(*) FROM invoice_line), (SELECT count(*) FROM artist), pg_backend_pid()"


def main(log_path):
    conn = None
    with open(log_path, "a", buffering=1) as log:
        while True:
            try:
                if conn is None:
                    conn = psycopg.connect(autocommit=True)
                lines, artists, pid = conn.execute(QUERY).fetchone()
                log.write(f"{time.time():.3f} ok {lines} {artists} {pid}\n")
            except psycopg.Error as exc:
                first = (str(exc).strip().splitlines() or [""])[0]
                log.write(f"{time.time():.3f} fail {type(exc).__name__}: {first}\n")
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.2)


if __name__ == "__main__":
    main(sys.argv[1])
