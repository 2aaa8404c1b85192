#!/usr/bin/env bash
# Deploys the stack on a single-node swarm with locally built images
# (rivulet:amd64 and local/mosquitto), publishes readings through the
# broker's published port and checks that averages come back. rivulet finds
# the broker by its service name through Swarm's DNS. The port is published
# in host mode and the broker uses DNS round-robin instead of a virtual IP:
# this machine's sandbox has neither the routing mesh nor IPVS.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/swarm/test-setup.sh
stack=rivulet-test-$$
cleanup() {
  docker stack rm "$stack" >/dev/null 2>&1 || true
  leave_swarm_if_ours
}
trap cleanup EXIT
docker stack config -c deploy/swarm/stack.yml >/dev/null 2>&1 || true
MQTT_PORT=$port MQTT_PUBLISH_MODE=host MQTT_ENDPOINT_MODE=dnsrr RIVULET_IMAGE=rivulet:amd64 MOSQUITTO_IMAGE=local/mosquitto RIVULET_ARCH=x86_64 \
  docker stack deploy -c deploy/swarm/stack.yml "$stack" >/dev/null
# Wait for the broker, then for rivulet to subscribe (it retries until the broker is up).
for _ in $(seq 60); do mosquitto_pub -h 127.0.0.1 -p "$port" -t probe -m x 2>/dev/null && break; sleep 1; done
mosquitto_sub -h 127.0.0.1 -p "$port" -t 'averages/#' -C 3 -W 90 > /tmp/$stack.out &
sub=$!
# Event time from 2027-01-15T08:00:00Z (1800000000000 ms), on a 5 s boundary.
base=1800000000000
for i in $(seq 0 40); do
  for s in a b c; do
    mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -t "sensors/$s/temperature" \
      -m "{\"ts\": $((base + i * 250)), \"temperature\": $((60 + i % 5))}"
  done
  sleep 0.25
done
# A later reading moves the watermark past the first windows.
for s in a b c; do mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -t "sensors/$s/temperature" -m "{\"ts\": $((base + 60000)), \"temperature\": 61}"; done
wait $sub || { echo "no averages came back from the swarm" >&2; docker service logs "${stack}_rivulet" 2>&1 | tail -20 >&2; exit 1; }
grep -q "\"window_start\":$base" /tmp/$stack.out
# The task's host name (and so its default MQTT client id) is stable.
name=$(docker inspect --format '{{.Config.Hostname}}' "$(docker ps -q --filter "name=${stack}_rivulet" | head -1)")
[[ "$name" =~ ^rivulet-.+-1$ ]] || { echo "unexpected task host name: $name" >&2; exit 1; }
grep -q '"readings":' /tmp/$stack.out
echo "swarm: $(wc -l < /tmp/$stack.out) averages through the stack"
rm -f /tmp/$stack.out
