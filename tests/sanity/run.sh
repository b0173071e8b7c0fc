#!/usr/bin/env bash
# ansible-test sanity and units on a copy of the collection at ansible_collections/pgops/dbrestore
# (ansible-test needs that path, outside this git checkout so it lists the copy's files).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="$ROOT/.venv/bin"
# the pip version ansible-test bootstraps into its virtualenvs
PIP_VERSION="$("$BIN/python" -c 'from ansible_test._internal.python_requirements import get_venv_packages as g
from types import SimpleNamespace as N; print(g(N(version="3.11"))["pip"])')"
WHEELS="$ROOT/.cache/pip-bootstrap"
if ! ls "$WHEELS"/pip-"$PIP_VERSION"-*.whl >/dev/null 2>&1; then
  "$BIN/pip" download -q --no-deps -d "$WHEELS" "pip==$PIP_VERSION"
fi
PIP_WHEEL="$(ls "$WHEELS"/pip-"$PIP_VERSION"-*.whl)"
mkdir -p ~/.ansible/test/cache
sed "s|@PIP_WHEEL@|$PIP_WHEEL|" "$ROOT/tests/sanity/get_pip.py" > ~/.ansible/test/cache/get_pip_"${PIP_VERSION//./_}".py

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
DEST="$WORK/ansible_collections/pgops/dbrestore"
mkdir -p "$DEST"
(cd "$ROOT" && git ls-files -co --exclude-standard | tar -cf - -T -) | tar -xf - -C "$DEST"
cd "$DEST"
"$BIN/ansible-test" sanity --venv --python 3.11 --requirements "$@"
"$BIN/ansible-test" units --venv --python 3.11 --requirements
