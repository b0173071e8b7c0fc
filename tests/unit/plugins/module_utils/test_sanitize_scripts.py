"""Which sanitize items are files and which are SQL, and what is wrong with them, before any server is involved."""

from __future__ import annotations

from pathlib import Path

from ansible_collections.pgops.dbrestore.plugins.module_utils.sanitize import is_file_item, load_scripts, scripts_digest


def test_one_word_ending_in_sql_is_a_file_anything_else_is_sql():
    assert is_file_item("/etc/pgops/scrub_users.sql") and is_file_item("scrub.sql")
    assert not is_file_item("TRUNCATE sessions") and not is_file_item("DELETE FROM t WHERE f = 'a.sql'")
    assert not is_file_item("/etc/pgops/scrub users.sql")  # a space: SQL, never a file


def test_scripts_are_read_once_and_problems_named(tmp_path: Path):
    scrub = tmp_path / "scrub.sql"
    scrub.write_text("UPDATE users SET email = 'x' || id;\n")
    empty = tmp_path / "empty.sql"
    empty.write_text("  \n")
    latin = tmp_path / "latin.sql"
    latin.write_bytes(b"UPDATE t SET n = '\xe9';")
    scripts, problems = load_scripts((str(scrub), "TRUNCATE sessions", str(tmp_path / "missing.sql"), str(empty),
                                      str(latin)))  # fmt: skip
    assert [s.name for s in scripts] == [str(scrub), "inline #2"]
    assert scripts[0].text == scrub.read_text() and len(scripts[0].sha256) == 64
    assert len(problems) == 3
    assert "missing.sql cannot be read" in problems[0] and "is empty" in problems[1] and "not UTF-8" in problems[2]
    assert scripts_digest(scripts) != scripts_digest(scripts[:1]) and scripts_digest([]) == ""
