# Sourced by the Swarm tests: tools, a single-node swarm (left again by
# `leave_swarm_if_ours`), the images, and a free port for the broker.
command -v mosquitto_pub >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto-clients >/dev/null; }
if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
  docker swarm init --advertise-addr 127.0.0.1 >/dev/null
  left_swarm=1
fi
leave_swarm_if_ours() {
  if [ "${left_swarm:-0}" = 1 ]; then docker swarm leave --force >/dev/null 2>&1 || true; fi
}
docker image inspect rivulet:amd64 >/dev/null 2>&1 || bash deploy/docker/build.sh amd64 >/dev/null
bash deploy/swarm/mosquitto-image.sh >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
