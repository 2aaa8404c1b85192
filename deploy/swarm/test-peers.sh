#!/usr/bin/env bash
# The Swarm stack with three rivulet replicas as one cluster of peers
# (pipeline-peers.yaml) on a single-node swarm: readings go in, one replica's
# container is killed mid-stream and Swarm replaces it (same slot, same host
# name and peer id, same state directory), and every window's average comes
# back with every reading counted once.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/swarm/test-setup.sh
stack=rivulet-peers-$$
out=$(mktemp)
cleanup() {
  kill "${sub:-0}" 2>/dev/null || true
  docker stack rm "$stack" >/dev/null 2>&1 || true
  leave_swarm_if_ours
  rm -f "$out"
}
trap cleanup EXIT
RIVULET_REPLICAS=3 RIVULET_PIPELINE=./pipeline-peers.yaml \
MQTT_PORT=$port MQTT_PUBLISH_MODE=host MQTT_ENDPOINT_MODE=dnsrr RIVULET_IMAGE=rivulet:amd64 MOSQUITTO_IMAGE=local/mosquitto RIVULET_ARCH=x86_64 \
  docker stack deploy -c deploy/swarm/stack.yml "$stack" >/dev/null
for _ in $(seq 60); do mosquitto_pub -h 127.0.0.1 -p "$port" -t probe -m x 2>/dev/null && break; sleep 1; done
logs() { docker service logs --raw "${stack}_rivulet" 2>&1; }
views_of_three() { logs | grep -c 'starting a view.*members=\[[^]]*,[^]]*,[^]]*\]' || true; }
# All three replicas in one view.
for _ in $(seq 90); do [ "$(views_of_three)" -ge 3 ] && break; sleep 1; done
[ "$(views_of_three)" -ge 3 ] || { echo "the replicas never formed a cluster of three" >&2; logs | tail -30 >&2; exit 1; }
sleep 3
mosquitto_sub -h 127.0.0.1 -p "$port" -t 'averages/#' -v > "$out" &
sub=$!
sensors="a b c d e f"
# Event time from 2027-01-15T08:00:00Z (1800000000000 ms), on a 5 s boundary.
base=1800000000000
publish() {  # readings i = $1 .. $2, 4 per second of event time
  for i in $(seq "$1" "$2"); do
    for s in $sensors; do
      mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -t "sensors/$s/temperature" -m "{\"ts\": $((base + i * 250)), \"temperature\": $((60 + i % 5))}"
    done
  done
}
publish 0 39
# kill -9 one replica; Swarm starts a new task in its slot.
victim=$(docker ps -q --filter "name=${stack}_rivulet" | head -1)
docker kill "$victim" >/dev/null
publish 40 79
for _ in $(seq 90); do [ "$(docker ps -q --filter "name=${stack}_rivulet" | wc -l)" -ge 3 ] && break; sleep 1; done
# A later reading per sensor moves every watermark past the windows.
for s in $sensors; do mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -t "sensors/$s/temperature" -m "{\"ts\": $((base + 120000)), \"temperature\": 61}"; done
# 80 readings per sensor, 4 windows of 5 s, 20 readings each.
python3 - "$out" <<'PY' || { logs | grep -v 'peers to wait\|part of a checkpoint\|checkpoint applied\|redelivered' | tail -40 >&2; exit 1; }
import json, sys, time
want = {(s, 1800000000000 + w * 5000): 20 for s in "abcdef" for w in range(4)}
deadline = time.time() + 120
while True:
    got = {}
    for line in open(sys.argv[1]):
        topic, _, body = line.partition(" ")
        r = json.loads(body)
        got[(r["sensor_id"], r["window_start"])] = r["readings"]
    if all(got.get(k) == v for k, v in want.items()):
        break
    if time.time() > deadline:
        bad = {k: got.get(k) for k, v in want.items() if got.get(k) != v}
        sys.exit(f"windows missing or miscounted after a replica was killed: {bad}")
    time.sleep(1)
print(f"swarm peers: {len(want)} windows, every reading counted once, one replica killed and replaced")
PY
