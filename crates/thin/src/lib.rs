//! stub
pub mod ir;
pub mod json;
pub mod size;
pub mod superblock;
pub mod xml;
