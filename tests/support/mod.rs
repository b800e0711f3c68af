pub mod hls_check;
pub mod server;
pub mod webrtc_publisher;
