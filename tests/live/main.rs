//! Privileged end-to-end tests: real cgroups, real workloads, the real
//! daemon and FUSE mount, compared with what the kernel reports.
//!
//! Run as root. A test that cannot run here says so and skips; with
//! CGMETRIC_REQUIRE_PRIVILEGED=1 (set by .ci/run) that is a failure.

#[path = "../support/mod.rs"]
mod support;

mod billing;
mod churn;
mod cpu;
mod crash;
mod discovery;
mod exited;
mod fixtures;
mod input;
mod lifecycle;
mod memory;
mod mount;
mod net;
mod overload;
mod privilege;
mod prometheus;
mod prometheus_server;
mod readers;
mod supervise;
mod tree;
mod uring;
mod walk;
