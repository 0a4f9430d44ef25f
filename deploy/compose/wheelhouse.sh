#!/usr/bin/env bash
# A wheelhouse (.wheelhouse/) with every third-party wheel the service images install, exactly
# as uv.lock pins them (hashes checked), for `docker build`s that cannot reach PyPI: the
# Dockerfile installs from it when present. Wheels for CPython 3.11 on manylinux x86_64, the
# images' platform, whatever the host's Python is.
set -euo pipefail
UV=${UV:-uv}
cd "$(dirname "$0")/../.."
out=.wheelhouse
mkdir -p "$out"
# pip takes a platform tag literally: name every manylinux glibc the images' (2.36) accepts.
platforms=(--platform manylinux2014_x86_64)
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
req=$(mktemp)
trap 'rm -f "$req"' EXIT
for args in "narthex-gateway" "narthex-auth" "narthex-features" "narthex-analytics" \
    "narthex-inference --extra cpu"; do
    # shellcheck disable=SC2086 # one word per argument
    "$UV" export --frozen --no-dev --no-emit-workspace --package $args -o "$req" >/dev/null
    # pip judges markers by the Python running it; an image's 3.11 may be older than this
    # one (bookworm's is 3.11.2): keep what any 3.11.x needs.
    sed -i "s/ ; python_full_version < '3\.11\.[0-9]*'//" "$req"
    # --isolated: the lock's pins and hashes, not a machine's pip.conf constraints or mirrors.
    python3 -m pip download --isolated --quiet --disable-pip-version-check --no-deps --require-hashes \
        --only-binary=:all: "${platforms[@]}" --python-version 3.11 \
        --implementation cp --abi cp311 -d "$out" -r "$req"
done
echo "$(find "$out" -name '*.whl' | wc -l) wheels in $out ($(du -sh "$out" | cut -f1))"
