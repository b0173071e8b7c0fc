"""Dumps of a database in every format the restore module reads, made with the real pg_dump."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

from tests.harness.pg import PgServer, client_bindir

FORMATS = ("custom", "directory", "tar", "plain", "plain.gz", "plain.zst", "plain.lz4")
_PG_DUMP_ARGS = {"custom": ["-Fc"], "directory": ["-Fd"], "tar": ["-Ft"], "plain": ["-Fp"]}


def make_dump(pg: PgServer, db: str, fmt: str, dest: Path) -> Path:
    """pg_dump db into dest (a file, or a directory for the directory format); compressed plain via the CLIs."""
    base = fmt.split(".")[0]
    target = dest if not fmt.startswith("plain.") else dest.with_name(dest.name + ".raw")
    subprocess.run(
        [str(client_bindir() / "pg_dump"), *_PG_DUMP_ARGS[base], "-f", str(target), "-d", db],
        env=pg.client_env(),
        check=True,
    )
    if fmt == "plain.gz":
        with open(target, "rb") as src, gzip.open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    elif fmt == "plain.zst":
        subprocess.run(["zstd", "-q", "-f", str(target), "-o", str(dest)], check=True)
    elif fmt == "plain.lz4":
        subprocess.run(["lz4", "-q", "-f", str(target), str(dest)], check=True)
    if target != dest:
        target.unlink()
    return dest
