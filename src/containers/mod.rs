//! Which cgroups are containers, what they are called, and the set of them
//! the daemon knows: [`runtime`] recognises runtimes' cgroups and reads
//! their names, [`discovery`] walks the hierarchies and [`watch`]es them
//! with inotify, and [`registry`] gives each container a slot and a unique
//! name (and numbers the cgroup tree under `cgroup/`).

pub mod discovery;
pub mod registry;
pub mod runtime;
pub mod watch;
