#!/usr/bin/env bash
# Builds the rivulet image from the static binaries of cross/build.sh.
#   bash deploy/docker/build.sh [amd64|arm64]   # one architecture, tagged rivulet:<arch> and rivulet:latest
#   bash deploy/docker/build.sh --multiarch     # linux/amd64 + linux/arm64 with docker buildx (pushes with --push)
set -euo pipefail
cd "$(dirname "$0")/../.."
ctx=target/docker-context
rm -rf "$ctx" && mkdir -p "$ctx/state"
arches=${1:-amd64}
[ "$arches" = "--multiarch" ] && arches="amd64 arm64"
for a in $arches; do
  [ -x "target/dist/$a/rivulet" ] || bash cross/build.sh "$a"
  mkdir -p "$ctx/$a" && cp "target/dist/$a/rivulet" "$ctx/$a/"
done
if [ ! -f /etc/ssl/certs/ca-certificates.crt ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ca-certificates >/dev/null
fi
cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
printf 'root:x:0:0:root:/:/sbin/nologin\nrivulet:x:10001:10001:rivulet:/var/lib/rivulet:/sbin/nologin\n' > "$ctx/passwd"
printf 'root:x:0:\nrivulet:x:10001:\n' > "$ctx/group"
cp configs/demo.yaml "$ctx/pipeline.yaml"
touch "$ctx/state/.keep"
host=$(uname -m | sed 's/x86_64/amd64/; s/aarch64/arm64/')
if [ "${1:-}" = "--multiarch" ]; then
  docker buildx build --platform linux/amd64,linux/arm64 -f deploy/docker/Dockerfile -t "${IMAGE:-rivulet:latest}" "${@:2}" "$ctx"
elif [ "$arches" = "$host" ]; then
  docker build -q --build-arg "TARGETARCH=$arches" -f deploy/docker/Dockerfile -t "rivulet:$arches" -t rivulet:latest "$ctx"
elif docker buildx version >/dev/null 2>&1; then
  docker buildx build --load --platform "linux/$arches" -f deploy/docker/Dockerfile -t "rivulet:$arches" "$ctx"
else
  echo "an $arches image on an $host machine needs docker buildx; or run this script on an $arches machine (a Pi)" >&2
  exit 1
fi
