pub mod webrtc_publisher;
