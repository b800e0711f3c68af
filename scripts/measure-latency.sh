#!/usr/bin/env bash
# Measures, on this machine, the WHIP POST -> 201 time and the time from the
# first media frame reaching the HLS writer to the first segment listed in
# the playlist, for N publications of samples/sample.mkv with
# `whipgate publish` (release build, server and client on 127.0.0.1).
# With `glass` as second argument it then measures, in headless Chromium,
# how far behind live a viewer of the watch page is: a camera filming the
# clock publishes from the publish page, the watch page plays the stream
# with hls.js, and the clock read back from the picture on screen gives the
# glass-to-glass delay (tests/latency.rs, glass_to_glass_llhls_vs_mpegts),
# for LL-HLS and for MPEG-TS HLS; median and 95th percentile of 60 samples.
#   usage: scripts/measure-latency.sh [N] [glass]   (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-5}"
cargo build --release -q
bin=target/release/whipgate
dir=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT
WHIPGATE_LOG=info "$bin" serve --http-listen 127.0.0.1:18480 --udp-listen 127.0.0.1:18489 \
  --data-dir "$dir/data" 2>"$dir/server.log" &
server=$!
for _ in $(seq 50); do curl -s -o /dev/null -X OPTIONS http://127.0.0.1:18480/whip/x && break; sleep 0.1; done
for i in $(seq "$n"); do
  WHIPGATE_LOG=warn "$bin" publish samples/sample.mkv "http://127.0.0.1:18480/whip/lat$i" --duration 4
done
sed 's/\x1b\[[0-9;]*m//g' "$dir/server.log" > "$dir/plain.log"
echo "POST -> 201 (ms, server side):"
grep -o 'session created.* ms=[0-9.]*' "$dir/plain.log" | sed 's/.* ms=//' | tr '\n' ' '; echo
echo "first frame -> first segment listed (ms; target duration 2 s, keyframe every 1 s):"
grep -o 'since_first_frame_ms=[0-9.]*' "$dir/plain.log" | sed 's/.*=//' | tr '\n' ' '; echo
if [ "${2:-}" = glass ]; then
  echo "glass to glass, watch page (hls.js) in headless Chromium:"
  cargo test -q --test latency -- --ignored --nocapture glass_to_glass_llhls_vs_mpegts 2>&1 |
    grep -E '^(llhls|mpegts):|panicked|test result'
fi
