pub mod flv;
pub mod push;
pub mod session;
pub mod target;
