#!/usr/bin/env bash
# Builds the amd64 image and runs the demo in it on a bounded generator;
# checks the results, the non-root user and the health check command.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/docker/build.sh amd64 >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed 's/    rate: 100 .*/    count: 20000\n    start: 1800000000000\n    rate: unlimited/' configs/demo.yaml > "$work/bounded.yaml"
chmod -R a+rX "$work"
out=$(docker run --rm -v "$work:/cfg:ro" rivulet:amd64 run /cfg/bounded.yaml)
lines=$(printf '%s\n' "$out" | grep -c '"window_start"' || true)
[ "$lines" -eq 25 ] || { echo "expected 25 window results from the image, got $lines" >&2; printf '%s\n' "$out" | head >&2; exit 1; }
[ "$(docker run --rm --entrypoint /rivulet rivulet:amd64 --version | cut -d' ' -f1)" = rivulet ]
user=$(docker image inspect rivulet:amd64 --format '{{.Config.User}}')
[ "$user" = "10001:10001" ] || { echo "image runs as '$user', not the rivulet user" >&2; exit 1; }
# The default command keeps a stats file fresh, so the health check passes.
cid=$(docker run -d rivulet:amd64)
trap 'docker rm -f "$cid" >/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 40); do
  docker exec "$cid" /rivulet health --stats-file /var/lib/rivulet/stats.json >/dev/null 2>&1 && break
  sleep 0.5
done
docker exec "$cid" /rivulet health --stats-file /var/lib/rivulet/stats.json
echo "docker: image ok ($(docker image inspect rivulet:amd64 --format '{{.Size}}') bytes), demo gave $lines results"
