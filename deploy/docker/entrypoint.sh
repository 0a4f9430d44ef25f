#!/bin/sh
# Every narthex image's entrypoint. Secrets arrive as files (Docker/Compose secrets, a volume
# the provisioning step wrote): NARTHEX_X_FILE=/path sets NARTHEX_X to the file's content.
# No arguments: run the image's service, as PID 1, so SIGTERM reaches uvicorn directly.
set -eu
for name in $(env | sed -n 's/^\(NARTHEX_[A-Z0-9_]*\)_FILE=.*/\1/p'); do
    eval "path=\${${name}_FILE}"
    # shellcheck disable=SC2154 # assigned by the eval above
    value=$(cat "$path")
    export "$name=$value"
    unset "${name}_FILE"
done
if [ "$#" -eq 0 ]; then
    exec python3 -m "narthex.${NARTHEX_SERVICE}"
fi
exec "$@"
