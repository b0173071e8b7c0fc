#!/usr/bin/python3
"""Stand-in for an Octopus app: its shards are databases on several servers.

Each request reads the generation value of every shard, in order, on one connection per shard
that it keeps open (a pool); a connection that breaks, or cannot be opened, fails the request,
and the next request opens it again. Appends to the log given as the first argument
"<unix time> ok <g>,<g>,..." (one generation, every shard), "<unix time> MIXED <g>,<g>,..." (shards
of two restores in one request) or "<unix time> fail <error>". The other arguments are the shards
as <database>@<host>; libpq PG* variables give the rest.
"""

import sys
import time

import psycopg


def main(log_path, shards):
    conns = {}
    with open(log_path, "a", buffering=1) as log:
        while True:
            read = []
            try:
                for shard in shards:
                    db, host = shard.split("@")
                    if shard not in conns:
                        conns[shard] = psycopg.connect(host=host, dbname=db, autocommit=True)
                    read.append(conns[shard].execute("SELECT g FROM generation").fetchone()[0])
                status = "ok" if len(set(read)) == 1 else "MIXED"
                log.write(f"{time.time():.3f} {status} {','.join(str(g) for g in read)}\n")
            except psycopg.Error as exc:
                first = (str(exc).strip().splitlines() or [""])[0]
                log.write(f"{time.time():.3f} fail {type(exc).__name__}: {first}\n")
                for shard, conn in list(conns.items()):
                    if conn.broken or conn.closed:
                        conn.close()
                        del conns[shard]
            time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
