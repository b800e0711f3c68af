pub mod frame;
pub mod h264;
pub mod time;
pub mod vp8;
