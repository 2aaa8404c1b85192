#!/usr/bin/env bash
# Writes rivulet into a Raspberry Pi OS image file before it is flashed, so
# the card boots straight into rivulet: binary, pipeline, systemd unit
# (enabled), host name, and optionally SSH enabled on first boot.
#
#   deploy/pi/write-image.sh IMAGE --hostname pi-01 --config pipeline.yaml \
#       [--binary target/dist/arm64/rivulet] [--env env-file] [--ssh]
#
# Works on the image file directly (no mounting, no root needed): the root
# file system (ext4, the second partition) is edited with debugfs, the boot
# partition (FAT, the first) with mtools. Needs sfdisk, debugfs and mcopy
# (Debian: fdisk, e2fsprogs, mtools). One image per node: copy the
# downloaded image, then run this on each copy with its host name.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
image=${1:-}
[ -n "$image" ] && [ -f "$image" ] || { echo "usage: $0 IMAGE --hostname NAME --config FILE [--binary FILE] [--env FILE] [--ssh]" >&2; exit 2; }
shift
hostname="" config="" envfile="" ssh=0
binary="$here/../../target/dist/arm64/rivulet"
while [ $# -gt 0 ]; do
  case "$1" in
    --hostname) hostname=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --env) envfile=$2; shift 2 ;;
    --ssh) ssh=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$hostname" ] && [ -n "$config" ] || { echo "--hostname and --config are required" >&2; exit 2; }
[[ "$hostname" =~ ^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$ ]] || { echo "bad host name: $hostname" >&2; exit 2; }
for f in "$config" "$binary" "$here/rivulet.service"; do [ -f "$f" ] || { echo "missing $f" >&2; exit 1; }; done
for t in sfdisk debugfs mcopy; do command -v $t >/dev/null || { echo "$t is needed (apt-get install fdisk e2fsprogs mtools)" >&2; exit 1; }; done

# Partition offsets, in 512-byte sectors.
read -r boot_start < <(sfdisk -d "$image" | awk -F'[=,]' '/start=/{for(i=1;i<=NF;i++) if($i~/start/){print $(i+1)+0; exit}}')
read -r root_start root_size < <(sfdisk -d "$image" | awk -F'[=,]' '/start=/{n++; if(n==2){for(i=1;i<=NF;i++){if($i~/start/)s=$(i+1)+0; if($i~/size/)z=$(i+1)+0}; print s, z}}')
[ -n "${root_start:-}" ] || { echo "$image: no second (root) partition" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dd if="$image" of="$work/root.img" bs=512 skip="$root_start" count="$root_size" status=none

cat "$here/rivulet.service" > "$work/rivulet.service"
echo "$hostname" > "$work/hostname"
debugfs -R "cat /etc/hosts" "$work/root.img" 2>/dev/null | grep -v '^127\.0\.1\.1' > "$work/hosts" || true
printf '127.0.1.1\t%s\n' "$hostname" >> "$work/hosts"

{
  for d in /usr /usr/local /usr/local/bin /etc /etc/rivulet /etc/systemd /etc/systemd/system /etc/systemd/system/multi-user.target.wants; do
    echo "mkdir $d"
  done
  put() { echo "rm $2"; echo "write $1 $2"; echo "sif $2 mode $3"; echo "sif $2 uid 0"; echo "sif $2 gid 0"; }
  put "$binary" /usr/local/bin/rivulet 0100755
  put "$config" /etc/rivulet/pipeline.yaml 0100644
  put "$work/rivulet.service" /etc/systemd/system/rivulet.service 0100644
  put "$work/hostname" /etc/hostname 0100644
  put "$work/hosts" /etc/hosts 0100644
  [ -n "$envfile" ] && put "$envfile" /etc/rivulet/environment 0100600
  echo "rm /etc/systemd/system/multi-user.target.wants/rivulet.service"
  echo "symlink /etc/systemd/system/multi-user.target.wants/rivulet.service /etc/systemd/system/rivulet.service"
} > "$work/commands"
debugfs -w -f "$work/commands" "$work/root.img" >"$work/debugfs.log" 2>&1 || { cat "$work/debugfs.log" >&2; exit 1; }
dd if="$work/root.img" of="$image" bs=512 seek="$root_start" conv=notrunc status=none

if [ "$ssh" = 1 ]; then
  : > "$work/ssh"
  MTOOLS_SKIP_CHECK=1 mcopy -o -i "$image@@$((boot_start * 512))" "$work/ssh" ::ssh
fi
echo "$image: rivulet installed for $hostname"
