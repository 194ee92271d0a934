//! Integration tests of the thin metadata layer against thin-provisioning-tools.

mod common;
mod corrupt;
mod crash;
mod model;
mod smoke;
