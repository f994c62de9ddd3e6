//! Real container runtimes from Debian's packages: Docker Engine (a
//! `dockerd` these tests start and stop themselves) and Podman, with a
//! busybox image built offline. Apart from the `live` tests, whose daemons
//! would otherwise list these containers.
//!
//! Run as root. A test that cannot run here says so and skips; with
//! CGMETRIC_REQUIRE_PRIVILEGED=1 (set by .ci/run) that is a failure.

#[path = "../support/mod.rs"]
// These tests use a few of the helpers.
#[allow(dead_code, unused_imports)]
mod support;

mod docker;
mod engine;
mod image;
mod podman;
