"""Run a collection module through ansible-playbook against localhost and return its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLLECTIONS = ROOT / ".cache" / "collections"

PLAYBOOK = """
- name: Run one module and keep its result
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Run the module
      {module}: "{{{{ module_args }}}}"
      register: module_result
      ignore_errors: true
    - name: Keep the result for the test
      ansible.builtin.copy:
        content: "{{{{ module_result | to_json }}}}"
        dest: "{{{{ result_file }}}}"
        mode: "0600"
      check_mode: false
      diff: false
"""


def ansible_env() -> dict[str, str]:
    return {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }


def run_module(module: str, args: dict, *, check: bool = False, diff: bool = False) -> dict:
    """ansible-playbook with the module as its only task; the registered result as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        book = Path(tmp) / "play.yml"
        book.write_text(PLAYBOOK.format(module=module))
        extra = Path(tmp) / "vars.json"
        result_file = Path(tmp) / "result.json"
        extra.write_text(json.dumps({"module_args": args, "result_file": str(result_file)}))
        argv = [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i", "localhost,",
            "-c", "local",
            "-e", f"ansible_python_interpreter={sys.executable}",
            "-e", f"@{extra}",
            str(book),
        ]  # fmt: skip
        argv += ["--check"] if check else []
        argv += ["--diff"] if diff else []
        proc = subprocess.run(argv, env=ansible_env(), capture_output=True, text=True, timeout=600, check=False)
        if not result_file.exists():
            raise RuntimeError(f"ansible-playbook failed before the module ran:\n{proc.stdout}\n{proc.stderr}")
        result = json.loads(result_file.read_text())
        result["_stdout"] = proc.stdout
        return result
