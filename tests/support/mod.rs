//! The harness of the privileged tests, shared by the `live` and `runtimes`
//! test binaries (each includes this folder with
//! `#[path = "../support/mod.rs"] mod support;`): real cgroups in every
//! hierarchy, a real daemon on a per-test mountpoint, and cleanup that runs
//! even when a test fails (everything is released in `Drop`).
//!
//! | module     | holds |
//! |------------|-------|
//! | [`gate`]   | skip gates: [`require!`](crate::require), [`require_host!`](crate::require_host), [`privileged`], [`tool`], [`gate::host`], [`gate::REQUIRE_ENV`] |
//! | [`cgroup`] | [`Cgroup`], [`Nest`], [`host_layout`] |
//! | [`daemon`] | the [`Daemon`] harness, [`BpfDir`], the workspace's binaries ([`daemon::PREBUILT_ENV`]), mount checks |
//! | [`net`]    | the `tcp_peer` helper: [`tcp_peer`], [`Cgroup::serve`], [`finish`], [`Sent`] |
//! | [`prometheus`] | a real Prometheus server scraping node_exporter over a daemon's mountpoint: [`Prometheus`], [`shipped_rules_holding_for`] |
//! | [`host`]   | host probes ([`rss_kib`], [`cpu_time`], [`cpu_time_outside`], [`fd_targets`], [`map_ids`], ...), [`promtool_check`], [`TestUser`], [`host_lock`] |
//! | [`timing`] | [`eventually`], [`heavy_turn`], [`reading`], [`Rng`] |
//! | [`names`]  | [`unique`], [`hex_id`] |
//!
//! Tests import everything from here (`crate::support::...`); the modules
//! are the map, not part of the paths tests use.

pub mod cgroup;
pub mod daemon;
pub mod gate;
pub mod host;
pub mod names;
pub mod net;
pub mod prometheus;
pub mod timing;

pub use cgroup::{host_layout, Cgroup, Nest};
pub use daemon::{
    binary, detach, is_live, is_mounted, is_running, scratch_mountpoint, workspace_binary, BpfDir,
    Daemon,
};
pub use gate::{privileged, tool};
pub use host::{
    cpu_time, cpu_time_outside, fd_targets, host_lock, map_ids, online_cpus, open_fds,
    promtool_check, rss_kib, HostLock, TestUser, HELPER_LOCK,
};
pub use names::{hex_id, unique};
pub use net::{finish, finish_client, tcp_peer, Sent};
pub use prometheus::{sample_value, shipped_rules, shipped_rules_holding_for, Prometheus};
pub use timing::{eventually, heavy_turn, reading, Rng};
