#!/usr/bin/env bash
# Installs rivulet (binary, pipeline, systemd unit) on Raspberry Pis over SSH
# and starts it.
#
#   deploy/pi/install.sh -c pipeline.yaml [-b target/dist/arm64/rivulet] [-e env-file] [-u pi] host1 host2 ...
#
# Each host needs SSH access for the user and sudo. Re-running upgrades in
# place (the service restarts). SSH/SCP can be overridden for tests.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
binary="$here/../../target/dist/arm64/rivulet"
config=""
envfile=""
user=pi
SSH=${SSH:-ssh}
SCP=${SCP:-scp}
usage() { echo "usage: $0 -c pipeline.yaml [-b binary] [-e env-file] [-u user] host..." >&2; exit 2; }
while getopts "c:b:e:u:h" o; do
  case "$o" in
    c) config=$OPTARG ;;
    b) binary=$OPTARG ;;
    e) envfile=$OPTARG ;;
    u) user=$OPTARG ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ -n "$config" ] && [ $# -gt 0 ] || usage
[ -f "$binary" ] || { echo "no binary at $binary: run cross/build.sh arm64 first" >&2; exit 1; }
# Refuse a pipeline that does not validate, before touching any host.
if command -v rivulet >/dev/null 2>&1; then rivulet validate "$config" >/dev/null; fi
for host in "$@"; do
  echo "== $host"
  files=("$binary" "$config" "$here/rivulet.service")
  [ -n "$envfile" ] && files+=("$envfile")
  $SCP -q "${files[@]}" "$user@$host:/tmp/"
  remote="set -e
    sudo install -D -m 0755 /tmp/rivulet /usr/local/bin/rivulet
    sudo install -D -m 0644 /tmp/$(basename "$config") /etc/rivulet/pipeline.yaml
    sudo install -D -m 0644 /tmp/rivulet.service /etc/systemd/system/rivulet.service"
  [ -n "$envfile" ] && remote="$remote
    sudo install -D -m 0600 /tmp/$(basename "$envfile") /etc/rivulet/environment"
  remote="$remote
    /usr/local/bin/rivulet validate /etc/rivulet/pipeline.yaml
    sudo systemctl daemon-reload
    sudo systemctl enable rivulet.service
    sudo systemctl restart rivulet.service
    systemctl is-active rivulet.service"
  $SSH "$user@$host" "$remote"
done
