"""sanitize: the scrub of docs/sanitize.md on a Rails users table, failures, and scripts that try to escalate.

The application's role owns its database and tables (not a superuser); the scripts run as it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from psycopg import sql

from ansible_collections.pgops.dbrestore.plugins.module_utils.copies import staging_name
from ansible_collections.pgops.dbrestore.plugins.module_utils.postgres import INSUFFICIENT_PRIVILEGE, PgOpsError
from ansible_collections.pgops.dbrestore.plugins.module_utils.restore import RestoreRequest, restore_database
from tests.conftest import drop_database
from tests.harness.dumps import make_dump
from tests.harness.pg import PgServer, client_bindir

pytestmark = pytest.mark.newest_major

ROOT = Path(__file__).resolve().parents[2]
APP = "rails_app"
PROD, STAGING = "rails_production", "rails_staging"

RAILS_SCHEMA = """
CREATE TABLE users (
  id bigserial PRIMARY KEY, email varchar NOT NULL DEFAULT '', encrypted_password varchar NOT NULL DEFAULT '',
  reset_password_token varchar, reset_password_sent_at timestamp, remember_created_at timestamp,
  sign_in_count integer NOT NULL DEFAULT 0, current_sign_in_ip inet, last_sign_in_ip inet, name varchar,
  phone varchar, api_key varchar, created_at timestamp NOT NULL DEFAULT now(),
  updated_at timestamp NOT NULL DEFAULT now());
CREATE UNIQUE INDEX index_users_on_email ON users (email);
CREATE UNIQUE INDEX index_users_on_reset_password_token ON users (reset_password_token);
CREATE TABLE sessions (id bigserial PRIMARY KEY, session_id varchar NOT NULL, data text);
CREATE TABLE oauth_access_tokens (id bigserial PRIMARY KEY, token varchar NOT NULL, revoked_at timestamp);
"""
RAILS_DATA = """
INSERT INTO users (email, encrypted_password, reset_password_token, current_sign_in_ip, name, phone, api_key)
SELECT 'person' || g || '@gmail.com', '$2a$12$real' || g, 'tok' || g, ('203.0.113.' || (g % 250))::inet,
       'Real Name ' || g, '+81-90-0000-' || g, 'live_key_' || g
FROM generate_series(1, 200) g;
INSERT INTO sessions (session_id, data) SELECT 'sid' || g, 'warden.user' FROM generate_series(1, 30) g;
INSERT INTO oauth_access_tokens (token, revoked_at) SELECT 't' || g, CASE WHEN g % 2 = 0 THEN now() END
FROM generate_series(1, 10) g;
"""


def doc_block(lang: str) -> str:
    """The page's block of that language, as written."""
    text = (ROOT / "docs" / "sanitize.md").read_text()
    return re.search(rf"```{lang}\n(.*?)```", text, re.S).group(1)


def restore(pg: PgServer, src: Path, check_mode: bool = False, **kw):
    req = RestoreRequest(db=STAGING, src=str(src), bindir=str(client_bindir()), **kw)
    return restore_database(pg.params(), req, check_mode=check_mode)


def app_sql(pg: PgServer, query: str, dbname: str = STAGING):
    with pg.connect(dbname, user=APP, password="rails-secret") as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else None


def app_is_superuser(pg: PgServer) -> bool:
    return pg.sql("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (APP,))[0][0]


@pytest.fixture
def rails(pg: PgServer, tmp_path: Path):
    """Production's dump (tables owned by the app's role) and the staging database it refreshes."""
    pg.sql(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'rails-secret'").format(sql.Identifier(APP)))
    for db in (PROD, STAGING):
        pg.sql(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(APP)))
        app_sql(pg, RAILS_SCHEMA, dbname=db)
    app_sql(pg, RAILS_DATA, dbname=PROD)
    app_sql(pg, "INSERT INTO users (email) VALUES ('old-staging@example.invalid')")
    scrub = tmp_path / "scrub_users.sql"
    scrub.write_text(doc_block("sql"))
    yield make_dump(pg, PROD, "custom", tmp_path / "production.dump"), scrub
    for name in pg.databases():
        if name.startswith(("rails_",)):
            drop_database(pg, name)
    pg.sql(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(APP)))
    pg.sql(sql.SQL("DROP ROLE {}").format(sql.Identifier(APP)))


def test_the_documented_scrub_applies_before_the_switch(pg: PgServer, rails):
    dump, scrub = rails
    group_vars = yaml.safe_load(doc_block("yaml"))
    items = [str(scrub) if i.endswith(".sql") else i for i in group_vars["restore_sanitize"]]
    verify = group_vars["restore_verify_query"]
    planned = restore(pg, dump, check_mode=True, sanitize=items, verify_query=verify)
    assert [p.split(" ")[0] for p in planned.plan] == ["create", "sanitize", "verify", "close"]
    res = restore(pg, dump, sanitize=items, verify_query=verify)
    assert res.steps_done == res.plan and "sanitize" in res.phases_ms
    assert [s["name"] for s in res.sanitized] == [str(scrub), "inline #2"]
    assert all(isinstance(s["ms"], int) and len(s["sha256"]) == 64 for s in res.sanitized)
    assert app_sql(pg, "SELECT count(*), count(*) FILTER (WHERE email LIKE 'user%@example.invalid' AND phone IS NULL "
                       "AND reset_password_token IS NULL AND current_sign_in_ip IS NULL AND api_key NOT LIKE 'live%' "
                       "AND name LIKE 'User %') FROM users") == [(200, 200)]  # fmt: skip
    assert app_sql(pg, "SELECT count(*) FROM sessions") == [(0,)]
    assert app_sql(pg, "SELECT count(*) FROM oauth_access_tokens") == [(5,)]
    # nothing of the mechanism stays in the copy; the record remembers the scripts
    assert app_sql(pg, "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'pgops%'") == [(0,)]
    assert res.marker_after["sanitize"]
    assert not restore(pg, dump, sanitize=items).changed  # same dump, same scripts: nothing to do
    assert restore(pg, dump, check_mode=True, sanitize=items[:1]).changed  # other scripts: restore again


def test_failing_script_leaves_the_live_database_untouched(pg: PgServer, rails):
    dump, scrub = rails
    with pytest.raises(PgOpsError, match=r"sanitize script inline #2 failed on the staging copy") as err:
        restore(pg, dump, sanitize=[str(scrub), "UPDATE users SET no_such_column = 1"])
    assert err.value.sqlstate == "42703"
    assert [s["name"] for s in err.value.details["sanitized"]] == [str(scrub)]  # the one that ran, timed
    assert app_sql(pg, "SELECT email FROM users") == [("old-staging@example.invalid",)]
    assert staging_name(STAGING) not in pg.databases()
    assert err.value.details["created"] == [] and err.value.details["renamed"] == []


@pytest.mark.parametrize(
    "attack",
    [
        "ALTER ROLE rails_app SUPERUSER",
        "RESET ROLE; ALTER ROLE rails_app SUPERUSER",
        "SELECT pg_catalog.set_config('role', 'postgres', false); ALTER ROLE rails_app SUPERUSER",
        "UPDATE users SET name = (SELECT rolpassword FROM pg_authid LIMIT 1)",
    ],
)
def test_script_cannot_gain_the_login_roles_rights(pg: PgServer, rails, attack: str):
    dump, _scrub = rails
    with pytest.raises(PgOpsError, match="sanitize script inline #1 failed") as err:
        restore(pg, dump, sanitize=[attack])
    assert err.value.sqlstate == INSUFFICIENT_PRIVILEGE
    assert not app_is_superuser(pg)
    assert app_sql(pg, "SELECT email FROM users") == [("old-staging@example.invalid",)]
    assert staging_name(STAGING) not in pg.databases()


def test_check_mode_finds_unreadable_scripts_and_a_superuser_owner(pg: PgServer, rails, tmp_path: Path):
    dump, scrub = rails
    missing = tmp_path / "missing.sql"
    with pytest.raises(PgOpsError, match=rf"nothing was changed.*{re.escape(str(missing))} cannot be read"):
        restore(pg, dump, check_mode=True, sanitize=[str(scrub), str(missing)])
    with pytest.raises(PgOpsError, match='"postgres", a superuser: sanitize scripts never run with superuser'):
        restore(pg, dump, check_mode=True, sanitize=[str(scrub)], owner="postgres")
    assert staging_name(STAGING) not in pg.databases()


def test_records_made_before_sanitize_existed_gain_its_column(pg: PgServer, rails):
    dump, scrub = rails
    restore(pg, dump)  # makes our records if this server has none yet
    pg.sql("ALTER TABLE pgops_dbrestore.restored DROP COLUMN sanitize")  # as an earlier version made them
    assert restore(pg, dump, check_mode=True, sanitize=[str(scrub)]).changed  # reads the old records
    res = restore(pg, dump, sanitize=[str(scrub)])
    assert res.marker_after["sanitize"] and app_sql(pg, "SELECT count(*) FROM users WHERE phone IS NULL") == [(200,)]
