//! The client crate against the real identity service, started in-process on
//! a fresh SQLite database for each test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cache;
mod common;
mod layer;
mod retries;
mod rpcs;
