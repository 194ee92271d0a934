//! Engine integration tests.

mod common;
mod concurrency;
mod crash;
mod model;
mod nospace;
mod zeroing;
