#!/usr/bin/env bash
# A private Docker engine for servetool's tests and for machines without a running one.
#   scripts/docker-engine.sh install      apt-get install docker.io debootstrap (root + apt only)
#   scripts/docker-engine.sh start        start dockerd with its own socket, data and exec roots
#   scripts/docker-engine.sh base-image   build local/bookworm-python:3.11 with debootstrap (no registry)
#   scripts/docker-engine.sh stop         stop that dockerd by its pid and unmount what it left
#   scripts/docker-engine.sh env          print the DOCKER_HOST line to eval
# Everything lives under $SERVETOOL_DOCKER_ROOT (default /tmp/servetool-docker). The engine has no
# bridge network and no iptables rules: containers use the host network, which this machine's kind
# needs (no bridge may be created here), and nothing else on the machine is touched.
set -euo pipefail

ROOT=${SERVETOOL_DOCKER_ROOT:-/tmp/servetool-docker}
SOCK="$ROOT/docker.sock"
PIDFILE="$ROOT/dockerd.pid"
BASE_IMAGE=${SERVETOOL_BASE_IMAGE_TAG:-local/bookworm-python:3.11}
MIRROR=${DEBIAN_MIRROR:-}
export DOCKER_HOST="unix://$SOCK"

say() { echo "docker-engine: $*" >&2; }

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

install() {
  if command -v dockerd >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    say "needs dockerd and debootstrap: install them (apt-get install docker.io debootstrap) as root"
    exit 1
  fi
  say "installing docker.io and debootstrap with apt"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null 2>&1 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null; }; }
}

start() {
  install
  if running; then
    say "already running (pid $(cat "$PIDFILE")), DOCKER_HOST=$DOCKER_HOST"
    return 0
  fi
  mkdir -p "$ROOT/data" "$ROOT/exec"
  say "starting dockerd (log: $ROOT/dockerd.log)"
  # setsid: the engine outlives this script but is still stopped by its recorded pid.
  setsid dockerd --host "$DOCKER_HOST" --data-root "$ROOT/data" --exec-root "$ROOT/exec" \
    --pidfile "$PIDFILE" --storage-driver=overlay2 --iptables=false --ip6tables=false \
    --bridge=none --ip-masq=false >"$ROOT/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 1 120); do
    if docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
      say "engine $(docker version --format '{{.Server.Version}}') up, DOCKER_HOST=$DOCKER_HOST"
      return 0
    fi
    sleep 0.25
  done
  say "dockerd did not answer within 30 s; last log lines:"
  tail -5 "$ROOT/dockerd.log" >&2
  exit 1
}

stop() {
  if running; then
    local pid
    pid=$(cat "$PIDFILE")
    # Containers first, so that none is left holding mounts under the roots.
    docker ps -q | xargs -r docker rm -f >/dev/null 2>&1 || true
    kill "$pid"
    for _ in $(seq 1 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    say "stopped dockerd (pid $pid)"
  fi
  pkill -f "containerd --config $ROOT/exec" 2>/dev/null || true
  umount "$ROOT/exec/netns/default" 2>/dev/null || true
  rm -f "$PIDFILE"
}

mirror() {
  if [ -n "$MIRROR" ]; then echo "$MIRROR"; return; fi
  # The mirror this machine's apt already uses (deb822 or one-line sources).
  local found
  found=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
          grep -v security | head -1 | sed -E 's/^URIs: *//; s/^deb (\[[^]]*\] )?//; s/ .*//')
  echo "${found:-http://deb.debian.org/debian}"
}

base_image() {
  start
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "$BASE_IMAGE exists"
    return 0
  fi
  local rootfs="$ROOT/rootfs"
  rm -rf "$rootfs"
  say "debootstrap bookworm + python3 from $(mirror) (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
    "$(mirror)" >"$ROOT/debootstrap.log" 2>&1 || { tail -5 "$ROOT/debootstrap.log" >&2; exit 1; }
  # What the official slim images also leave out: apt lists, caches, docs.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  say "built $BASE_IMAGE ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  base-image) base_image ;;
  env) echo "export DOCKER_HOST=$DOCKER_HOST" ;;
  *) echo "usage: $0 install|start|stop|base-image|env" >&2; exit 2 ;;
esac
