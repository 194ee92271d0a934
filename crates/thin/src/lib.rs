//! stub
pub mod ir;
