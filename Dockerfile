# Build on Rust's bookworm image, run on bookworm-slim with only the FFmpeg
# and OpenSSL runtime libraries.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      pkg-config clang libclang-dev libssl-dev \
      libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libswresample-dev \
      libavfilter-dev libavdevice-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/whipgate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
      ca-certificates libssl3 libavcodec59 libavformat59 libavutil57 libswresample4 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/whipgate /usr/local/bin/whipgate
# The shipped presets are built in; these copies are a starting point for
# your own (mount a directory of NAME.toml files here to add or replace).
COPY presets /etc/whipgate/presets
ENV WHIPGATE_PRESETS_DIR=/etc/whipgate/presets
WORKDIR /var/lib/whipgate
# HTTP (WHIP, HLS) and the one WebRTC UDP port.
EXPOSE 8080/tcp 8189/udp
ENTRYPOINT ["whipgate"]
CMD ["serve"]
