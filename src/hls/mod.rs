//! HLS output: MPEG-TS and fragmented MP4 (CMAF) muxing, segmenting,
//! LL-HLS parts and playlists.
//!
//! `ts`, `segmenter`, `fmp4`, `cmaf` and `playlist` are sans-IO: nothing
//! there reads a clock, touches a file or awaits; frames and the wall clock
//! come in as arguments, bytes and playlist text go out. `output` (the hub
//! reader) owns timing, fills `store`, the in-memory side the HTTP handlers
//! serve and wait on, and persists files through `storage` (local
//! directory, nothing, or an S3 bucket).

pub mod cmaf;
pub mod fmp4;
pub mod master;
pub mod output;
pub mod playlist;
pub mod segmenter;
pub mod storage;
pub mod store;
pub mod ts;
