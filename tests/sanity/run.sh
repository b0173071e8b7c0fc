#!/usr/bin/env bash
# ansible-test sanity and units on a copy of the collection at ansible_collections/pgops/dbrestore
# (ansible-test needs that path, outside this git checkout so it lists the copy's files).
#
# The modules and module_utils run on the managed host, so they are tested on the oldest and the
# newest Python that ansible-test supports for targets, on 3.9 and 3.11, and on the controller
# Python (the one of .venv):
#   sanity: every test on the controller Python; compile and import (the tests that look at a
#           target Python) on each of the others;
#   units:  tests/unit/plugins/module_utils and tests/unit/plugins/modules on each of them.
# The interpreters are looked up as pythonX.Y under `pyenv root`/versions when pyenv is there, and
# on PATH; a missing one is an error. PGOPS_SANITY_PYTHONS="3.8 3.13" tests another set.
# Extra arguments go to ansible-test sanity (for example --test pep8).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="$ROOT/.venv/bin"

read -r CONTROLLER OLDEST NEWEST SUPPORTED < <("$BIN/python" -c 'import sys
from ansible_test._internal.constants import CONTROLLER_PYTHON_VERSIONS as c, SUPPORTED_PYTHON_VERSIONS as s
v = "%d.%d" % sys.version_info[:2]
print(v if v in c else "unsupported", s[0], s[-1], ",".join(s))')
if [ "$CONTROLLER" = unsupported ]; then
  echo "tests/sanity/run.sh: .venv's Python $("$BIN/python" -V 2>&1) cannot run ansible-test" >&2
  exit 1
fi

# X.Y -> path of a working pythonX.Y (the newest patch release pyenv has, else the one on PATH)
find_python() {
  local v="$1" c root
  local -a candidates=()
  if command -v pyenv >/dev/null 2>&1 && root="$(pyenv root 2>/dev/null)"; then
    mapfile -t candidates < <(printf '%s\n' "$root/versions/$v"{,.*}/bin/"python$v" | sort -rV)
  fi
  if c="$(command -v "python$v")"; then
    candidates+=("$c")  # a pyenv shim of a version that is not selected fails the check below
  fi
  for c in "${candidates[@]}"; do
    if [ "$("$c" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$v" ]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

# shellcheck disable=SC2086  # a list of versions, split on purpose
mapfile -t PYTHONS < <(printf '%s\n' "$CONTROLLER" ${PGOPS_SANITY_PYTHONS:-"$OLDEST" 3.9 3.11 "$NEWEST"} | sort -uV)
# ansible-test finds an interpreter, and creates its virtualenvs from it, as pythonX.Y on PATH: a
# directory of its own, first on PATH, has one for each version that runs the one found
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/bin"
TARGET_SANITY=()
missing=()
for v in "${PYTHONS[@]}"; do
  [ "$v" = "$CONTROLLER" ] && continue
  if [[ ",$SUPPORTED," != *",$v,"* ]]; then
    echo "tests/sanity/run.sh: ansible-test does not test Python $v (it knows $SUPPORTED)" >&2
    exit 1
  fi
  if py="$(find_python "$v")"; then
    printf '#!/usr/bin/env bash\nexec %q "$@"\n' "$py" > "$WORK/bin/python$v"
    chmod +x "$WORK/bin/python$v"
    TARGET_SANITY+=(--target-python "$v")
    echo "Python $v: $py"
  else
    missing+=("$v")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "tests/sanity/run.sh: no working interpreter for Python ${missing[*]}" >&2
  echo "  looked in \$(pyenv root)/versions/X.Y.*/bin and on PATH; install them (for example" >&2
  echo "  'pyenv install ${missing[*]}') or set PGOPS_SANITY_PYTHONS to the versions to test" >&2
  exit 1
fi
export PATH="$WORK/bin:$PATH"
CONTROLLER_ARGS=(--controller "origin:python=venv/$CONTROLLER")

# ansible-test bootstraps pip into its virtualenvs with a get-pip.py it downloads; tests/sanity/get_pip.py
# stands in for it with the same pip version's wheel
PIP_VERSIONS="$("$BIN/python" -c 'import sys
from types import SimpleNamespace as N
from ansible_test._internal.python_requirements import get_venv_packages as g
print(*sorted({g(N(version=v))["pip"] for v in sys.argv[1:]}))' "${PYTHONS[@]}")"
WHEELS="$ROOT/.cache/pip-bootstrap"
mkdir -p ~/.ansible/test/cache
for PIP_VERSION in $PIP_VERSIONS; do
  if ! ls "$WHEELS"/pip-"$PIP_VERSION"-*.whl >/dev/null 2>&1; then
    "$BIN/pip" download -q --no-deps -d "$WHEELS" "pip==$PIP_VERSION"
  fi
  PIP_WHEEL="$(ls "$WHEELS"/pip-"$PIP_VERSION"-*.whl)"
  sed "s|@PIP_WHEEL@|$PIP_WHEEL|" "$ROOT/tests/sanity/get_pip.py" > ~/.ansible/test/cache/get_pip_"${PIP_VERSION//./_}".py
done

DEST="$WORK/ansible_collections/pgops/dbrestore"
mkdir -p "$DEST"
(cd "$ROOT" && git ls-files -co --exclude-standard | tar -cf - -T -) | tar -xf - -C "$DEST"
cd "$DEST"

# all run, whatever the first ones say
status=0
"$BIN/ansible-test" sanity "${CONTROLLER_ARGS[@]}" --target-python "$CONTROLLER" "${TARGET_SANITY[@]}" --requirements "$@" ||
  status=1
# tests/conftest.py is the harness of the tests on real servers (tests/integration), written for the
# controller's Python only; the unit tests use none of it, so their copy goes without it
rm -f "$DEST/tests/conftest.py"
# one run per Python: ansible-test stops at the first failing one, and each should be heard
for v in "${PYTHONS[@]}"; do
  "$BIN/ansible-test" units "${CONTROLLER_ARGS[@]}" --target-python "venv/$v" --requirements || status=1
done
exit "$status"
