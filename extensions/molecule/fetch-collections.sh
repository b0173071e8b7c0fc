#!/usr/bin/env bash
# Put the third-party collections the scenarios (and the collection's users)
# need into .cache/collections without Galaxy: they are taken from the
# `ansible` community package on PyPI, whose 12.x line matches ansible-core 2.19.
# Cached: nothing is downloaded when every collection is already there.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dest="${PGOPS_COLLECTIONS_DIR:-$repo_root/.cache/collections}/ansible_collections"
ansible_version="${PGOPS_ANSIBLE_PACKAGE_VERSION:-12.3.0}"
python="${PYTHON:-$repo_root/.venv/bin/python}"
collections=(containers/podman community/postgresql)

missing=()
for c in "${collections[@]}"; do
    [[ -f "$dest/$c/MANIFEST.json" ]] || missing+=("$c")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download -q --no-deps --only-binary=:all: \
    -d "$tmp" "ansible==$ansible_version"

mkdir -p "$dest"
"$python" - "$tmp"/ansible-*.whl "$dest" "${missing[@]}" <<'PY'
import shutil, sys, zipfile
from pathlib import Path

wheel, dest, wanted = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
with zipfile.ZipFile(wheel) as zf:
    for c in wanted:
        prefix = f"ansible_collections/{c}/"
        members = [m for m in zf.namelist() if m.startswith(prefix)]
        if not members:
            sys.exit(f"fetch-collections: {c} is not in {wheel}")
        shutil.rmtree(dest / c, ignore_errors=True)
        for m in members:
            zf.extract(m, dest.parent)
        print(f"fetch-collections: extracted {c.replace('/', '.')}")
PY
