#!/usr/bin/env bash
# Run molecule scenarios end to end on a fresh Debian/Ubuntu host, as root:
#   extensions/molecule/run.sh [scenario...]     (default: every scenario)
# Installs podman & co, fetches the needed collections, builds the local base
# image (all cached), then runs `molecule test` per scenario. Exits non-zero
# if any scenario fails.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
venv="${VENV:-$repo_root/.venv}"
cd "$repo_root"

bash "$here/setup-host.sh"
PYTHON="$venv/bin/python" bash "$here/fetch-collections.sh"
bash "$here/build-base-image.sh"

# This checkout is the collection pgops.dbrestore (same link as `make collections`).
mkdir -p .cache/collections/ansible_collections/pgops
ln -sfn "$repo_root" .cache/collections/ansible_collections/pgops/dbrestore

export PATH="$venv/bin:$PATH"
export CONTAINERS_CONF="$here/containers.conf"
export ANSIBLE_COLLECTIONS_PATH="$repo_root/.cache/collections"
export ANSIBLE_FORCE_COLOR="${ANSIBLE_FORCE_COLOR:-0}"
export PY_COLORS="${PY_COLORS:-0}"

if (($# == 0)); then
    mapfile -t scenarios < <(find "$here" -mindepth 2 -maxdepth 2 -name molecule.yml \
        -printf '%h\n' | xargs -n1 basename | sort)
else
    scenarios=("$@")
fi

failed=()
for scenario in "${scenarios[@]}"; do
    echo "=== molecule test -s $scenario"
    start=$SECONDS
    if molecule test -s "$scenario"; then
        echo "=== $scenario passed in $((SECONDS - start))s"
    else
        echo "=== $scenario FAILED after $((SECONDS - start))s"
        failed+=("$scenario")
    fi
done

if ((${#failed[@]})); then
    echo "molecule: failed scenarios: ${failed[*]}" >&2
    exit 1
fi
echo "molecule: ${#scenarios[@]} scenario(s) passed"
