#!/usr/bin/env bash
# Installs the system packages whipgate needs to build and to run its tests
# (Debian 12 / Ubuntu 22.04+). Idempotent: it installs only what is missing.
set -euo pipefail
pkgs=(pkg-config clang libclang-dev
      libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libswresample-dev
      libavfilter-dev libavdevice-dev libssl-dev ffmpeg curl ca-certificates
      nginx libnginx-mod-rtmp libnginx-mod-stream openssl
      chromium)  # tests/browser.rs: the web console in headless Chromium (H264 WebRTC, hls.js)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
