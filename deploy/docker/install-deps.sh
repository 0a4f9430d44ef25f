#!/bin/sh
# Install one workspace member's third-party dependencies into /opt/venv, exactly as uv.lock
# pins them (hashes required): from /wheels when a wheelhouse was copied in, else from PyPI.
#   install-deps.sh <package> [--extra <name>]...
set -eu
package=$1
shift
uv export --no-dev --no-emit-workspace --package "$package" "$@" -o /tmp/requirements.txt >/dev/null
if ls /wheels/*.whl >/dev/null 2>&1; then
    set -- --no-index --find-links /wheels
else
    set --
fi
uv pip install --python /opt/venv/bin/python --require-hashes "$@" -r /tmp/requirements.txt
rm /tmp/requirements.txt
