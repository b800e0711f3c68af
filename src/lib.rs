//! whipgate: WHIP (WebRTC) ingest to HLS. The binary (`main.rs`) is a thin
//! CLI over this library.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod error;
pub mod fuzzing;
pub mod hls;
pub mod http;
pub mod hub;
pub mod media;
pub mod preset;
pub mod publish;
pub mod rtc;
pub mod rtmp;
pub mod server;
pub mod state;
pub mod streams;
pub mod telemetry;
pub mod tls;
pub mod transcode;
