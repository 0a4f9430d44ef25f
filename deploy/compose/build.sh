#!/usr/bin/env bash
# Build every image docker-compose.yml runs, tagged immutably with the source they came from
# and labelled so that what ran can be reproduced:
#   narthex/{gateway,auth,features,analytics,inference}:<tag>   (Dockerfile)
#   narthex/{redis,postgres,prometheus}:<tag>                    (deploy/compose/infra.Dockerfile)
# <tag> is sha-<commit> (12 hex digits); a tree with changes gets sha-<commit>-dirty.<digest of the
# changes>, so a tag never names two different builds. No `latest`.
# Prints `NARTHEX_TAG=<tag>` last: docker-compose.yml reads it from the environment or .env.
#
# Environment: BASE_IMAGE, UV_IMAGE, INFRA_BASE_IMAGE (defaults: the official images; see
# make-base.sh for machines without Docker Hub), GPU=1 also builds narthex/inference-gpu,
# MODELS_DIR (default .state/models: run `narthex models build` first), DOCKER.
set -euo pipefail
cd "$(dirname "$0")/../.."
DOCKER=${DOCKER:-docker}
MODELS_DIR=${MODELS_DIR:-.state/models}
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}

commit=$(git rev-parse HEAD)
# sha-<commit>, as mesh/ names its images (kustomize newTag).
tag=sha-${commit:0:12}
if [[ -n $(git status --porcelain --untracked-files=normal) ]]; then
    changes=$({ git diff HEAD; git ls-files --others --exclude-standard | sort | xargs -r sha256sum; } \
        | sha256sum | cut -c1-8)
    tag="$tag-dirty.$changes"
fi

if [[ ! -f $MODELS_DIR/fraud/config.yaml || ! -f $MODELS_DIR/minilm/config.yaml ]]; then
    echo "no built-in models in $MODELS_DIR: run \`make models\` (narthex models build) first" >&2
    exit 1
fi
if [[ -L $MODELS_DIR ]]; then
    echo "$MODELS_DIR is a symbolic link, which a build context cannot follow: copy it" >&2
    exit 1
fi

args=(--build-arg "GIT_COMMIT=$commit" --label "org.opencontainers.image.version=$tag"
    --label "org.opencontainers.image.created=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
[[ -n ${BASE_IMAGE:-} ]] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[[ -n ${UV_IMAGE:-} ]] && args+=(--build-arg "UV_IMAGE=$UV_IMAGE")

# One label per model version: its sha256, as metadata.json records it (sha256 of model.onnx).
model_labels=(--build-arg "MODELS_DIR=$MODELS_DIR")
for meta in "$MODELS_DIR"/*/*/metadata.json; do
    model_labels+=(--label "$(python3 -c '
import json, sys
m = json.load(open(sys.argv[1]))
print("dev.narthex.model.%s.v%s.sha256=%s" % (m["name"], m["version"], m["sha256"]))
' "$meta")")
done

build() {
    local image=$1
    shift
    local started=$SECONDS
    "$DOCKER" build --quiet "${args[@]}" -t "narthex/$image:$tag" "$@" . >/dev/null
    printf '%-12s %4ds  %s\n' "$image" $((SECONDS - started)) \
        "$("$DOCKER" image inspect -f '{{.Size}}' "narthex/$image:$tag" | numfmt --to=iec)"
}

declare -A port=([gateway]=8000 [features]=8002)
for service in gateway features; do
    build "$service" --target service --build-arg "SERVICE=$service" \
        --build-arg "PORT=${port[$service]}"
done
build analytics --target analytics --build-arg SERVICE=analytics --build-arg PORT=8004 \
    --build-arg "MODELS_DIR=$MODELS_DIR"
build auth --target service --build-arg SERVICE=auth --build-arg PORT=8001 --build-arg ALSO=./cli
build inference --target inference-cpu --build-arg SERVICE=inference --build-arg PORT=8003 \
    --build-arg "EXTRAS=--extra cpu" "${model_labels[@]}"
if [[ ${GPU:-0} == 1 ]]; then
    build inference-gpu --target inference-gpu "${model_labels[@]}"
fi

infra=(-f deploy/compose/infra.Dockerfile)
[[ -n ${INFRA_BASE_IMAGE:-} ]] && infra+=(--build-arg "INFRA_BASE_IMAGE=$INFRA_BASE_IMAGE")
for image in redis postgres prometheus; do
    build "$image" "${infra[@]}" --target "$image"
done
echo "NARTHEX_TAG=$tag"
