//! Engine integration tests.

mod common;
mod concurrency;
mod crash;
mod faults;
mod model;
mod move_data;
mod nospace;
mod reconcile;
mod sealed;
mod space_watch;
mod stats;
mod zeroing;
