pub mod browser;
pub mod clock_camera;
pub mod hls_check;
pub mod nginx;
pub mod sample_frames;
pub mod server;
pub mod webrtc_publisher;
pub mod whip_http;
