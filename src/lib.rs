//! dbpool-operator: keeps PostgreSQL connection pools out of a permanent failure state.
//!
//! Modules: `api` (the DbPool resource), and the binary in `main.rs`.
pub mod api;
