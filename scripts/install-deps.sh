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
# tests/storage_s3.rs: moto's S3-compatible server, from PyPI (Debian has no
# package of it). Used from python3 when that has it, else from a venv of its
# own (Debian's python3 refuses system-wide pip installs), which the test finds.
moto_venv="${WHIPGATE_MOTO_VENV:-$HOME/.cache/whipgate/moto}"
if ! python3 -c 'import moto.server, flask, flask_cors' 2>/dev/null \
   && [ ! -x "$moto_venv/bin/moto_server" ]; then
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends python3-venv
  fi
  rm -rf "$moto_venv"
  python3 -m venv "$moto_venv"
  "$moto_venv/bin/pip" install -q 'moto[server]>=5.0,<6'
fi
