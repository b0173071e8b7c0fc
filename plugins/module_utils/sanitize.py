# Copyright: pgops.dbrestore contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Sanitize scripts: SQL run on the staging copy before the switch, with the database owner's rights only.

A superuser cannot give up its rights inside a session (RESET ROLE undoes SET ROLE). So each
script runs inside a SECURITY DEFINER function owned by the database's owner: PostgreSQL runs
its body as the owner and refuses every role change there (SET ROLE, RESET ROLE, SET SESSION
AUTHORIZATION, set_config('role', ...)). The function lives in a schema of ours made for that
one script and is dropped in the same transaction: nothing of it stays in the restored copy.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import (
    ConnParams,
    PgOpsError,
    connect,
    ident,
    one_line,
    psycopg,
    sql,
)


@dataclass(frozen=True)
class Script:
    name: str  # the file's path, or "inline #N"
    text: str
    sha256: str


def is_file_item(item: str) -> bool:
    """One word ending in .sql names a file; anything else is SQL (every statement has a space in it)."""
    return item.endswith(".sql") and not any(c.isspace() for c in item)


def load_scripts(items: tuple[str, ...]) -> tuple[list[Script], list[str]]:
    """The scripts, read once (the SQL that runs is the SQL that was checked), and what is wrong with them."""
    scripts: list[Script] = []
    problems: list[str] = []
    for n, item in enumerate(items, 1):
        if is_file_item(item):
            path = os.path.abspath(item)
            try:
                with open(path, "rb") as f:
                    data = f.read()
                text = data.decode("utf-8")
            except OSError as exc:
                problems.append(f"sanitize script {path} cannot be read ({exc.strerror}): fix the path or its "
                                "permissions for the user the module runs as")  # fmt: skip
                continue
            except UnicodeDecodeError:
                problems.append(f"sanitize script {path} is not UTF-8 text: save it as UTF-8")
                continue
            name = path
        else:
            text, name = item, f"inline #{n}"
        if not text.strip():
            problems.append(f"sanitize script {name} is empty: remove it from sanitize")
            continue
        scripts.append(Script(name, text, hashlib.sha256(text.encode()).hexdigest()))
    return scripts, problems


def scripts_digest(scripts: list[Script]) -> str:
    """One hash of the scripts in order: part of the record, so changed scripts restore again."""
    return hashlib.sha256("\n".join(s.sha256 for s in scripts).encode()).hexdigest() if scripts else ""


def owner_problems(conn: Any, owner: str) -> list[str]:
    """The owner the scripts run as must exist, must not be a superuser, and we must be able to act as it."""
    row = conn.execute(
        "SELECT r.rolsuper, pg_catalog.pg_has_role(r.oid, 'MEMBER') OR (SELECT rolsuper FROM pg_catalog.pg_roles "
        "WHERE rolname = current_user) FROM pg_catalog.pg_roles r WHERE r.rolname = %s",
        (owner,),
    ).fetchone()
    if row is None:
        return [f'the owner "{owner}" that sanitize scripts run as does not exist: create it or set owner']
    if row[0]:
        return [
            f'the restored copy would be owned by "{owner}", a superuser: sanitize scripts never run with superuser '
            "rights, set owner to the application's role (ALTER DATABASE ... OWNER TO it, or the owner option)"
        ]
    if not row[1]:
        return [f'the login role may not act as "{owner}" to run the sanitize scripts: GRANT "{owner}" TO it, or log '
                "in as a superuser"]  # fmt: skip
    return []


def run_scripts(params: ConnParams, dbname: str, scripts: list[Script], owner: str) -> Iterator[dict[str, Any]]:
    """Run each script in a transaction of its own, as owner; yield name, sha256 and milliseconds of each."""
    with connect(params.with_db(dbname)) as conn:
        for script in scripts:
            t = time.monotonic()
            _run_one(conn, script, owner)
            yield {"name": script.name, "sha256": script.sha256, "ms": int((time.monotonic() - t) * 1000)}


def _run_one(conn: Any, script: Script, owner: str) -> None:
    schema = ident(f"pgops_sanitize_{secrets.token_hex(4)}")
    func = sql.SQL("{}.run(text)").format(schema)
    try:
        with conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            conn.execute(
                sql.SQL("CREATE FUNCTION {}.run(script text) RETURNS void LANGUAGE plpgsql SECURITY DEFINER "
                        "SET search_path = \"$user\", public AS 'BEGIN EXECUTE script; END'").format(schema)
            )  # fmt: skip
            conn.execute(sql.SQL("REVOKE ALL ON FUNCTION {} FROM PUBLIC").format(func))
            conn.execute(sql.SQL("ALTER FUNCTION {} OWNER TO {}").format(func, ident(owner)))
            conn.execute(sql.SQL("SELECT {}.run(%s)").format(schema), (script.text,))
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))
    except psycopg.Error as exc:
        raise PgOpsError(
            f"sanitize script {script.name} failed on the staging copy (it runs as {owner!r}, in one transaction, "
            f"without psql meta-commands or COMMIT): {one_line(exc)}",
            sqlstate=exc.sqlstate,
        ) from exc
