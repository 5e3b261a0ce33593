//! End-to-end tests: a real server on a random loopback port, real clients (the
//! `sealpost` binary and the `sealpost-core` library) in temporary home directories.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod at_rest;
mod chat;
mod concurrency;
mod crash_recovery;
mod devices;
mod follow;
mod hostile_input;
mod malicious_server;
mod offline;
mod operations;
mod property;
mod push;
mod safety;
