#!/bin/sh
# Install one workspace member and the members it depends on (not editable, no third-party
# packages: install-deps.sh put those in) into /opt/venv; `also` names extra members whose
# code comes along without their dependencies.
#   install-code.sh <package> "<also>" [--extra <name>]...
set -eu
package=$1
also=$2
shift 2
members=$(uv export --no-dev --no-editable --no-hashes --no-header --no-annotate \
    --package "$package" "$@" | grep '^\./')
# shellcheck disable=SC2086 # word splitting is the point: one argument per member
uv pip install --python /opt/venv/bin/python --no-deps --no-index $members $also
