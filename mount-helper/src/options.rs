//! mount(8)'s arguments to a helper, and `-o` words to the daemon's options.

/// What mount(8) asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub mountpoint: String,
    /// `-f`: pretend (mount(8)'s "fake" mode).
    pub fake: bool,
    /// `-v`: say what is done.
    pub verbose: bool,
    /// The daemon's arguments, from the `-o` words.
    pub daemon_args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageError {
    /// mount(8) always passes a spec and a directory.
    MissingArguments,
    /// A flag mount(8) does not pass to helpers.
    UnknownFlag(String),
    /// An `-o` word cgmetric does not know.
    UnknownOption(String),
    /// An `-o` word that needs `=VALUE` without one, or the other way round.
    BadValue(String),
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UsageError::MissingArguments => {
                write!(f, "usage: mount.cgmetric SPEC DIR [-sfnv] [-o OPTIONS]")
            }
            UsageError::UnknownFlag(flag) => write!(f, "unknown flag {flag}"),
            UsageError::UnknownOption(word) => write!(
                f,
                "unknown option '{word}' (known: {})",
                DAEMON_OPTIONS
                    .iter()
                    .map(|(w, _)| *w)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            UsageError::BadValue(word) => write!(
                f,
                "option '{word}' needs the form its name says (word=value or word)"
            ),
        }
    }
}

/// The `-o` words that become daemon options: word, and whether it takes a
/// value. Each mirrors a long option (`bpf_dir=DIR` is `--bpf-dir DIR`).
const DAEMON_OPTIONS: &[(&str, bool)] = &[
    ("cgroup", true),
    ("docker_root", true),
    ("containerd_state", true),
    ("containers_storage", true),
    ("cgroup_root", true),
    ("bpf_dir", true),
    ("state_dir", true),
    ("keep_exited", true),
    ("net_class", true),
    ("window", true),
    ("fuse_spin", true),
    ("open_files", true),
    ("prometheus_names", true),
    ("no_ebpf", false),
    ("no_cgroup_walk", false),
    ("no_fuse_uring", false),
    ("no_supervise", false),
    ("takeover", false),
    ("private", false),
];

/// Words mount(8) and fstab pass that concern the mount, not cgmetric.
fn is_generic(word: &str) -> bool {
    const GENERIC: &[&str] = &[
        "defaults",
        "ro",
        "rw",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "owner",
        "nofail",
        "_netdev",
        "exec",
        "noexec",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "atime",
        "noatime",
        "relatime",
        "strictatime",
        "nodiratime",
        "sync",
        "async",
        "silent",
        "loud",
    ];
    GENERIC.contains(&word) || word.starts_with("x-") || word.starts_with("comment=")
}

/// Parses `mount.cgmetric SPEC DIR [-sfnv] [-o OPTIONS] [-t TYPE]`.
pub fn parse(args: &[String]) -> Result<Request, UsageError> {
    let mut positional = Vec::new();
    let mut words = Vec::new();
    let (mut fake, mut verbose) = (false, false);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-o" => words.extend(args.next().ok_or(UsageError::MissingArguments)?.split(',')),
            // The type (-t cgmetric) and namespace (-N) are mount(8)'s business.
            "-t" | "-N" => {
                args.next();
            }
            flag if flag.starts_with('-') && flag.len() > 1 => {
                for c in flag[1..].chars() {
                    match c {
                        'f' => fake = true,
                        'v' => verbose = true,
                        // Sloppy and no-mtab need nothing from a FUSE helper.
                        's' | 'n' => {}
                        _ => return Err(UsageError::UnknownFlag(flag.to_string())),
                    }
                }
            }
            _ => positional.push(arg.clone()),
        }
    }
    let [_spec, mountpoint] =
        <[String; 2]>::try_from(positional).map_err(|_| UsageError::MissingArguments)?;
    let mut daemon_args = Vec::new();
    for word in words
        .into_iter()
        .filter(|w| !w.is_empty() && !is_generic(w))
    {
        let (name, value) = match word.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (word, None),
        };
        let takes_value = DAEMON_OPTIONS
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, takes)| *takes)
            .ok_or_else(|| UsageError::UnknownOption(word.to_string()))?;
        if takes_value != value.is_some() || value == Some("") {
            return Err(UsageError::BadValue(word.to_string()));
        }
        daemon_args.push(format!("--{}", name.replace('_', "-")));
        daemon_args.extend(value.map(str::to_string));
    }
    Ok(Request {
        mountpoint,
        fake,
        verbose,
        daemon_args,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split(' ').map(String::from).collect()
    }

    #[test]
    fn words_mirror_the_long_options() {
        let r = parse(&args("cgmetric /run/cgmetric -o rw,cgroup=tenants/*,bpf_dir=/sys/fs/bpf/x,no_ebpf,window=2s,fuse_spin=0,no_fuse_uring,open_files=0,cgroup=b")).unwrap();
        assert_eq!(r.mountpoint, "/run/cgmetric");
        assert_eq!(
            r.daemon_args,
            [
                "--cgroup",
                "tenants/*",
                "--bpf-dir",
                "/sys/fs/bpf/x",
                "--no-ebpf",
                "--window",
                "2s",
                "--fuse-spin",
                "0",
                "--no-fuse-uring",
                "--open-files",
                "0",
                "--cgroup",
                "b"
            ]
        );
        assert!(!r.fake && !r.verbose);
        let r = parse(&args(
            "cgmetric /mnt -o state_dir=/var/lib/billing,keep_exited=15m,prometheus_names=cadvisor",
        ))
        .unwrap();
        assert_eq!(
            r.daemon_args,
            [
                "--state-dir",
                "/var/lib/billing",
                "--keep-exited",
                "15m",
                "--prometheus-names",
                "cadvisor"
            ]
        );
    }

    #[test]
    fn fstab_and_mount_words_are_not_cgmetric_s() {
        let r = parse(&args(
            "cgmetric /mnt -sn -o defaults,nofail,_netdev,x-systemd.automount,noatime -t cgmetric",
        ))
        .unwrap();
        assert!(r.daemon_args.is_empty());
        let r = parse(&args("cgmetric /mnt -fv")).unwrap();
        assert!(r.fake && r.verbose);
    }

    #[test]
    fn mistakes_are_clear_errors() {
        assert_eq!(
            parse(&args("cgmetric /mnt -o bogus=1")),
            Err(UsageError::UnknownOption("bogus=1".into()))
        );
        assert!(parse(&args("cgmetric /mnt -o bogus"))
            .unwrap_err()
            .to_string()
            .contains("unknown option 'bogus'"));
        assert_eq!(
            parse(&args("cgmetric /mnt -o no_ebpf=1")),
            Err(UsageError::BadValue("no_ebpf=1".into()))
        );
        assert_eq!(
            parse(&args("cgmetric /mnt -o cgroup")),
            Err(UsageError::BadValue("cgroup".into()))
        );
        assert_eq!(
            parse(&args("cgmetric /mnt -o cgroup=")),
            Err(UsageError::BadValue("cgroup=".into()))
        );
        assert_eq!(parse(&args("cgmetric")), Err(UsageError::MissingArguments));
        assert_eq!(
            parse(&args("cgmetric /mnt -x")),
            Err(UsageError::UnknownFlag("-x".into()))
        );
    }
}
