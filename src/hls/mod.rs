//! HLS output: sans-IO MPEG-TS and fragmented MP4 muxing, segmenting and
//! playlists.
//!
//! Nothing here reads a clock, touches a file or awaits: frames and the wall
//! clock come in as arguments, bytes and playlist text go out. The caller
//! (`output`) owns storage and timing.

pub mod fmp4;
pub mod output;
pub mod playlist;
pub mod segmenter;
pub mod ts;
