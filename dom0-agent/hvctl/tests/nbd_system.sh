#!/usr/bin/env bash
# NBD system test for `hvctl volume serve`, driven by an outside client (qemu-io from Debian's
# qemu-utils). For a mirrored and a thin volume: write patterns through NBD, flush, write more
# without flushing, kill the server with SIGKILL (no warning), restart it on the same images,
# verify every flushed pattern and that the pool checks clean (metadata and mirror legs).
#
# Usage: tests/nbd_system.sh [path-to-hvctl]   (default: target/debug/hvctl, built if missing)
set -euo pipefail

HVCTL=${1:-${HVCTL:-target/debug/hvctl}}
if ! command -v qemu-io >/dev/null; then
    echo "nbd_system: SKIP: qemu-io not installed (Debian package qemu-utils)"
    exit 0
fi
if [ ! -x "$HVCTL" ]; then
    cargo build -q -p hvctl
fi
base=/dev/shm
[ -d "$base" ] || base=${TMPDIR:-/tmp}
dir=$(mktemp -d "$base/hvctl-nbd.XXXXXX")
server=""
cleanup() {
    if [ -n "$server" ]; then kill -9 "$server" 2>/dev/null || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT

D=(-d "$dir/a.img" -d "$dir/b.img" -d "$dir/c.img")
"$HVCTL" volume create-pool -d "$dir/a.img:fast" -d "$dir/b.img:fast" -d "$dir/c.img:slow" --disk-size 192M >/dev/null
"$HVCTL" volume "${D[@]}" create m 64M --layout mirror >/dev/null
"$HVCTL" volume "${D[@]}" create-thin-pool tp 64M >/dev/null
"$HVCTL" volume "${D[@]}" create t 512M --thin-pool tp >/dev/null

port=""

# Starts the server on an ephemeral port (the first time) or the same port again.
start_server() {
    local vol=$1
    : >"$dir/server.log"
    "$HVCTL" volume "${D[@]}" serve "$vol" --port "${port:-0}" 2>"$dir/server.log" &
    server=$!
    for _ in $(seq 1 200); do
        local p
        p=$(sed -n 's|.*nbd://127.0.0.1:\([0-9]*\)/.*|\1|p' "$dir/server.log" | head -n1)
        if [ -n "$p" ]; then port=$p; return 0; fi
        sleep 0.025
    done
    echo "nbd_system: FAIL: server for $vol did not start"; cat "$dir/server.log"; exit 1
}

qio() {
    local vol=$1; shift
    local out
    out=$(qemu-io -f raw "nbd://127.0.0.1:$port/$vol" "$@" 2>&1) || { echo "$out"; return 1; }
    if grep -qiE "fail|error" <<<"$out"; then echo "$out"; return 1; fi
}

fail=0
for vol in m t; do
    port=""
    start_server "$vol"
    # Flushed writes: must survive the kill.
    qio "$vol" -c "write -P 0xa5 0 1M" -c "write -P 0x5a 4M 64k" -c "write -P 0x3c 10M 4k" \
        -c "write -P 0x77 20M 512" -c "flush"
    # Unflushed writes in flight when the server dies.
    qemu-io -f raw "nbd://127.0.0.1:$port/$vol" -c "write -P 0x99 30M 2M" >/dev/null 2>&1 &
    client=$!
    sleep 0.05
    kill -9 "$server"; wait "$server" 2>/dev/null || true
    wait "$client" 2>/dev/null || true
    server=""
    start_server "$vol"
    if qio "$vol" -c "read -P 0xa5 0 1M" -c "read -P 0x5a 4M 64k" -c "read -P 0x3c 10M 4k" \
        -c "read -P 0x77 20M 512" -c "read -P 0 1M 1M"; then
        echo "nbd_system: $vol: flushed patterns intact after SIGKILL"
    else
        echo "nbd_system: FAIL: $vol: pattern mismatch after SIGKILL"; fail=1
    fi
    kill -9 "$server"; wait "$server" 2>/dev/null || true
    server=""
done

if "$HVCTL" volume "${D[@]}" check --deep; then
    echo "nbd_system: pool consistent after kills"
else
    echo "nbd_system: FAIL: pool check"; fail=1
fi
"$HVCTL" volume "${D[@]}" list
if [ "$fail" = 0 ]; then echo "nbd_system: PASS"; else exit 1; fi
