//! Shared test support: a real control plane client (`kube`), real PostgreSQL servers
//! (`postgres`), a TCP fault proxy (`proxy`) and condition waiting with deadlines (`wait`).
//!
//! Every integration test file includes it with `mod support;`; not every file uses every part.
#![allow(dead_code)]

pub mod helm;
pub mod kube;
pub mod operator;
pub mod postgres;
pub mod proxy;
pub mod wait;
