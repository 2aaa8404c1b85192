#!/usr/bin/env bash
# For machines without a registry (CI, tests): packs this machine's
# Mosquitto binary and its shared libraries into a FROM-scratch image
# tagged local/mosquitto. On a real cluster use eclipse-mosquitto instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v mosquitto >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; }
ctx=target/mosquitto-context
rm -rf "$ctx" && mkdir -p "$ctx/etc" "$ctx/mosquitto/config" "$ctx/mosquitto/data"
bin=$(command -v mosquitto)
cp --parents "$bin" "$ctx"
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do cp -L --parents "$lib" "$ctx"; done
printf 'root:x:0:0::/:/sbin/nologin\nmosquitto:x:1883:1883::/mosquitto:/sbin/nologin\n' > "$ctx/etc/passwd"
printf 'root:x:0:\nmosquitto:x:1883:\n' > "$ctx/etc/group"
cp deploy/swarm/mosquitto.conf "$ctx/mosquitto/config/"
cat > "$ctx/Dockerfile" <<DOCKER
FROM scratch
COPY . /
ENTRYPOINT ["$bin", "-c", "/mosquitto/config/mosquitto.conf"]
DOCKER
docker build -q -t local/mosquitto "$ctx" >/dev/null
echo local/mosquitto
