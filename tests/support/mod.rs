pub mod server;
pub mod webrtc_publisher;
