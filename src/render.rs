//! Text formats: one value a file, `metrics` (one container), `metric` (all
//! containers, the `/proc/metric` format of cgmetric's predecessor) and
//! `metrics.prom` (Prometheus text exposition format).

use std::fmt::Write;
use std::sync::Arc;

use crate::cli::PrometheusNames;
use crate::containers::registry::Metered;
use crate::metrics::{ClassMetricDef, MetricDef, Sample, Scale, Value, CLASS_METRICS, METRICS};
use crate::sample::spent::{Source, Spent};

/// A single-value file: the value and a newline.
pub fn value_file(value: Value) -> String {
    format!("{value}\n")
}

/// `<file> <value>` a line, for one container's `metrics` file.
pub fn container_metrics(sample: &Sample) -> String {
    let mut out = String::new();
    for (def, value) in sample.iter() {
        out.push_str(def.file);
        out.push(' ');
        push_value(&mut out, value);
        out.push('\n');
    }
    for (file, value) in sample.class_files() {
        out.push_str(&file);
        out.push(' ');
        push_count(&mut out, value);
        out.push('\n');
    }
    out
}

/// `<name>_<file> <value>` a line, for the root `metric` file.
pub fn metric_lines(out: &mut String, name: &str, sample: &Sample) {
    for (def, value) in sample.iter() {
        out.push_str(name);
        out.push('_');
        out.push_str(def.file);
        out.push(' ');
        push_value(out, value);
        out.push('\n');
    }
    for (file, value) in sample.class_files() {
        out.push_str(name);
        out.push('_');
        out.push_str(&file);
        out.push(' ');
        push_count(out, value);
        out.push('\n');
    }
}

/// The aggregate files write thousands of numbers a scrape: `itoa` rather
/// than the formatting machinery, which was most of their rendering time.
fn push_count(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// A value as the plain files show it (`Value`'s `Display`).
fn push_value(out: &mut String, value: Value) {
    match value {
        Value::Count(n) => push_count(out, n),
        Value::Max => out.push_str("max"),
    }
}

/// `n` with its last `digits` digits after a decimal point, zero-padded.
fn push_fixed(out: &mut String, n: u64, digits: u32) {
    let unit = 10u64.pow(digits);
    push_count(out, n / unit);
    out.push('.');
    let mut buffer = itoa::Buffer::new();
    let fraction = buffer.format(n % unit);
    for _ in fraction.len()..digits as usize {
        out.push('0');
    }
    out.push_str(fraction);
}

/// Every container's metrics in Prometheus text format: one family per
/// catalogue row, HELP and TYPE once, the container's labels (see
/// [`label_set`]) on every series, no timestamps. With `names` cAdvisor, a
/// row cAdvisor has is rendered under cAdvisor's family, with its labels and
/// its way of writing an unset limit (see [`Family`]).
///
/// The containers that ended lately (`exited`) keep their series, with the
/// labels they had, so that each series goes on to its final value. Should
/// a live container have the very same labels (a runtime restarted the
/// same container), the ended one's series add `state="exited"`.
pub fn prometheus(
    live: &[(Arc<Metered>, Sample)],
    exited: &[(Arc<Metered>, Sample)],
    own: &OwnMetrics,
    names: PrometheusNames,
) -> String {
    // Each container's labels are escaped once, not once a series.
    let mut labels: Vec<String> = live.iter().map(|(c, _)| label_set(c, names)).collect();
    let taken: std::collections::HashSet<String> = labels.iter().cloned().collect();
    for (c, _) in exited {
        let mut set = label_set(c, names);
        if taken.contains(&set) {
            set.push_str(",state=\"exited\"");
        }
        labels.push(set);
    }
    let samples: Vec<&(Arc<Metered>, Sample)> = live.iter().chain(exited).collect();
    // Sized once (6,000 series for 200 containers): each series is its
    // labels plus a family name and a number, and the headers come on top.
    let series_bytes: usize = samples
        .iter()
        .zip(&labels)
        .map(|((_, s), l)| (l.len() + 64) * s.iter().count())
        .sum();
    let mut out = String::with_capacity(series_bytes + 300 * METRICS.len());
    for def in METRICS {
        let mut series = samples
            .iter()
            .zip(&labels)
            .filter_map(|((_, s), labels)| Some((labels, s.get(def.id)?)))
            .peekable();
        if series.peek().is_none() {
            continue;
        }
        let family = Family::of(def, names);
        family_header(&mut out, def, &family);
        for (labels, value) in series {
            out.push_str(family.prefix);
            out.push_str(family.name);
            out.push('{');
            out.push_str(labels);
            if !family.labels.is_empty() {
                out.push(',');
                out.push_str(family.labels);
            }
            out.push_str("} ");
            match value {
                Value::Max if family.unset_as_zero => out.push('0'),
                value => write_prom_value(&mut out, value, def.scale),
            }
            out.push('\n');
        }
    }
    for def in &CLASS_METRICS {
        class_family(&mut out, def, samples.iter().map(|(_, s)| s).zip(&labels));
    }
    if let Some(health) = own.ebpf_health {
        ebpf_health_family(&mut out, health);
    }
    if let Some(spent) = own.spent {
        spent_families(&mut out, spent);
    }
    if let Some(errors) = own.ledger_write_errors {
        let _ = writeln!(
            out,
            "# HELP cgmetric_ledger_write_errors_total Failed writes of the billing ledger \
             and its index (records stay pending and are retried)."
        );
        let _ = writeln!(out, "# TYPE cgmetric_ledger_write_errors_total counter");
        let _ = writeln!(out, "cgmetric_ledger_write_errors_total {errors}");
    }
    out
}

/// The daemon's own figures that `metrics.prom` carries after the
/// containers': each is left out where it does not apply.
#[derive(Default)]
pub struct OwnMetrics<'a> {
    /// Events the eBPF programs could not count (with network accounting).
    pub ebpf_health: Option<[u64; 3]>,
    /// Failed ledger writes (with a state directory).
    pub ledger_write_errors: Option<u64>,
    /// What aggregate reads cost, by source.
    pub spent: Option<&'a Spent>,
}

/// What aggregate reads cost, so that being scraped is visible in what is
/// scraped: `rate()` of the seconds over `rate()` of the reads is one
/// read's cost by source.
fn spent_families(out: &mut String, spent: &Spent) {
    let _ = writeln!(
        out,
        "# HELP cgmetric_aggregate_reads_total Reads of metric and metrics.prom served."
    );
    let _ = writeln!(out, "# TYPE cgmetric_aggregate_reads_total counter");
    let _ = writeln!(out, "cgmetric_aggregate_reads_total {}", spent.reads());
    let _ = writeln!(
        out,
        "# HELP cgmetric_aggregate_cpu_seconds_total CPU time the daemon spent on those \
         reads, by source (not counting the read being served)."
    );
    let _ = writeln!(out, "# TYPE cgmetric_aggregate_cpu_seconds_total counter");
    for source in Source::ALL {
        let _ = writeln!(
            out,
            "cgmetric_aggregate_cpu_seconds_total{{source=\"{}\"}} {:.6}",
            source.label(),
            spent.total(source).as_secs_f64()
        );
    }
    let _ = writeln!(
        out,
        "# HELP cgmetric_aggregate_walked_files_total Cgroup files those reads took from \
         the cgroup walk instead of reading them (0 with --no-cgroup-walk, or where the \
         walk is not available)."
    );
    let _ = writeln!(out, "# TYPE cgmetric_aggregate_walked_files_total counter");
    let _ = writeln!(
        out,
        "cgmetric_aggregate_walked_files_total {}",
        spent.walked_files()
    );
    let _ = writeln!(
        out,
        "# HELP cgmetric_aggregate_ebpf_snapshots_total Those reads that took the eBPF \
         counters from one read of every map entry instead of a lookup per container (0 \
         with --no-ebpf, or where the maps hold far more entries than there are containers)."
    );
    let _ = writeln!(
        out,
        "# TYPE cgmetric_aggregate_ebpf_snapshots_total counter"
    );
    let _ = writeln!(
        out,
        "cgmetric_aggregate_ebpf_snapshots_total {}",
        spent.snapshots()
    );
}

/// One per-class family: a series per container and class, the class as a
/// label.
fn class_family<'a>(
    out: &mut String,
    def: &ClassMetricDef,
    samples: impl Iterator<Item = (&'a Sample, &'a String)>,
) {
    let mut header = false;
    for (sample, labels) in samples {
        for class in &sample.classes {
            if !header {
                let _ = writeln!(out, "# HELP cgmetric_{} {}", def.prom, def.help);
                let _ = writeln!(out, "# TYPE cgmetric_{} counter", def.prom);
                header = true;
            }
            out.push_str("cgmetric_");
            out.push_str(def.prom);
            out.push('{');
            out.push_str(labels);
            out.push_str(",class=\"");
            write_escaped(out, &class.class);
            out.push_str("\"} ");
            push_count(out, (def.pick)(class));
            out.push('\n');
        }
    }
}

/// Events the eBPF programs could not count, so that an undercount is seen.
fn ebpf_health_family(out: &mut String, health: [u64; 3]) {
    let _ = writeln!(
        out,
        "# HELP cgmetric_ebpf_uncounted_total Events the eBPF programs could not count, by reason."
    );
    let _ = writeln!(out, "# TYPE cgmetric_ebpf_uncounted_total counter");
    let reasons = [
        "traffic_map_full",
        "connection_map_full",
        "unattributed_connection",
    ];
    for (reason, count) in reasons.iter().zip(health) {
        let _ = writeln!(
            out,
            "cgmetric_ebpf_uncounted_total{{reason=\"{reason}\"}} {count}"
        );
    }
}

/// The family a catalogue row is rendered under.
struct Family {
    prefix: &'static str,
    name: &'static str,
    /// The family's own labels, rendered, after the container's.
    labels: &'static str,
    /// Whether an unset limit reads 0 instead of `+Inf`.
    unset_as_zero: bool,
}

impl Family {
    /// cAdvisor's family where asked for and cAdvisor has the value, the
    /// row's `cgmetric_` family otherwise: a value cAdvisor lacks is not
    /// dropped.
    fn of(def: &MetricDef, names: PrometheusNames) -> Family {
        match (names, def.cadvisor) {
            (PrometheusNames::Cadvisor, Some(c)) => Family {
                prefix: "",
                name: c.family,
                labels: c.labels,
                unset_as_zero: c.unset_as_zero,
            },
            _ => Family {
                prefix: "cgmetric_",
                name: def.prom,
                labels: "",
                unset_as_zero: false,
            },
        }
    }
}

fn family_header(out: &mut String, def: &MetricDef, family: &Family) {
    let kind = match def.kind {
        crate::metrics::PromType::Counter => "counter",
        crate::metrics::PromType::Gauge => "gauge",
    };
    let (prefix, name) = (family.prefix, family.name);
    let help = def.help;
    let _ = writeln!(out, "# HELP {prefix}{name} {help}");
    let _ = writeln!(out, "# TYPE {prefix}{name} {kind}");
}

/// A container's labels, escaped: the ones cAdvisor and the kubelet give
/// the same container, so that rules and dashboards can move between them.
///
/// - `container`: the Kubernetes container name (as the kubelet labels it),
///   or the directory name for a container Kubernetes does not run;
/// - `namespace`, `pod`: Kubernetes containers only;
/// - `name`: the directory name, unique on the host at any time (cAdvisor's
///   `name` is the runtime's name for it), so the key to join series on;
/// - `id`: the runtime's container id (the cgroup's for `--cgroup` ones);
///   with cAdvisor's names, the cgroup path, as cAdvisor's `id` is;
/// - `image`: where the runtime records it;
/// - `runtime`, with cgmetric's names only (cAdvisor has no such label).
///
/// Each is one value for the container's whole life: the labels add no
/// series beyond one set per container.
fn label_set(container: &Metered, names: PrometheusNames) -> String {
    let identity = &container.identity;
    let k8s = identity.kubernetes.as_ref();
    let cadvisor = names == PrometheusNames::Cadvisor;
    let cgroup_path = cadvisor.then(|| format!("/{}", container.cgroup.display()));
    let id = cgroup_path.as_deref().unwrap_or(container.id.as_str());
    let labels = [
        (
            "container",
            Some(k8s.map_or(container.name.as_str(), |k| k.container.as_str())),
        ),
        ("namespace", k8s.map(|k| k.namespace.as_str())),
        ("pod", k8s.map(|k| k.pod.as_str())),
        ("name", Some(container.name.as_str())),
        ("id", Some(id)),
        ("image", identity.image.as_deref()),
        ("runtime", (!cadvisor).then_some(container.runtime)),
    ];
    let mut out = String::new();
    for (name, value) in labels {
        let Some(value) = value else { continue };
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(name);
        out.push_str("=\"");
        write_escaped(&mut out, value);
        out.push('"');
    }
    out
}

/// A value in the family's base unit, exact (no float rounding).
pub fn write_prom_value(out: &mut String, value: Value, scale: Scale) {
    match (value, scale) {
        (Value::Max, _) => out.push_str("+Inf"),
        (Value::Count(n), Scale::One) => push_count(out, n),
        (Value::Count(n), Scale::Milli) => push_fixed(out, n, 3),
        (Value::Count(n), Scale::Micro) => push_fixed(out, n, 6),
    }
}

/// A label value escaped as the exposition format requires.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    write_escaped(&mut out, value);
    out
}

/// Appends a label value escaped as the exposition format requires:
/// backslash, double quote and newline.
pub fn write_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::MetricId as M;

    fn sample() -> Sample {
        let mut s = Sample::default();
        s.set(M::CpuUsageUsec, Some(2_500_001));
        s.set(M::CpuMillicores, Some(1500));
        s.set_value(M::MemoryLimit, Value::Max);
        s
    }

    #[test]
    fn plain_formats() {
        assert_eq!(value_file(Value::Count(42)), "42\n");
        assert_eq!(value_file(Value::Max), "max\n");
        assert_eq!(
            container_metrics(&sample()),
            "cpu_usage_usec 2500001\ncpu_millicores 1500\nmemory_limit max\n"
        );
        let mut out = String::new();
        metric_lines(&mut out, "busybox1", &sample());
        assert_eq!(
            out,
            "busybox1_cpu_usage_usec 2500001\nbusybox1_cpu_millicores 1500\nbusybox1_memory_limit max\n"
        );
    }

    fn prom_value(value: Value, scale: Scale) -> String {
        let mut out = "x ".to_string();
        write_prom_value(&mut out, value, scale);
        out.split_off(2)
    }

    #[test]
    fn prometheus_values_are_in_base_units() {
        assert_eq!(
            prom_value(Value::Count(2_500_001), Scale::Micro),
            "2.500001"
        );
        assert_eq!(prom_value(Value::Count(1500), Scale::Milli), "1.500");
        assert_eq!(prom_value(Value::Count(7), Scale::Milli), "0.007");
        assert_eq!(prom_value(Value::Max, Scale::One), "+Inf");
        assert_eq!(prom_value(Value::Count(0), Scale::Micro), "0.000000");
        assert_eq!(
            prom_value(Value::Count(u64::MAX), Scale::One),
            "18446744073709551615"
        );
        assert_eq!(
            prom_value(Value::Count(u64::MAX), Scale::Micro),
            "18446744073709.551615"
        );
    }

    #[test]
    fn exited_series_keep_their_labels_unless_a_live_one_has_them() {
        let c = |slot, name, id| Arc::new(Metered::named(slot, name, id));
        let live = [(c(0, "web", "1"), sample())];
        let exited = [
            // Restarted in place: same name and id as a live one.
            (c(1, "web", "1"), sample()),
            // Gone for good.
            (c(2, "job", "2"), sample()),
        ];
        let text = prometheus(
            &live,
            &exited,
            &OwnMetrics {
                ledger_write_errors: Some(3),
                ..OwnMetrics::default()
            },
            PrometheusNames::Cgmetric,
        );
        let series =
            |labels: &str| format!("cgmetric_cpu_usage_seconds_total{{{labels}}} 2.500001\n");
        let web = "container=\"web\",name=\"web\",id=\"1\",runtime=\"cgroup\"";
        assert!(text.contains(&series(web)));
        assert!(text.contains(&series(&format!("{web},state=\"exited\""))));
        assert!(text.contains(&series(
            "container=\"job\",name=\"job\",id=\"2\",runtime=\"cgroup\""
        )));
        assert_eq!(text.matches("cgmetric_cpu_usage_seconds_total{").count(), 3);
        assert_eq!(
            text.matches("# TYPE cgmetric_cpu_usage_seconds_total counter\n")
                .count(),
            1
        );
        assert!(text.ends_with("cgmetric_ledger_write_errors_total 3\n"));
        assert!(!prometheus(
            &live,
            &[],
            &OwnMetrics::default(),
            PrometheusNames::Cgmetric
        )
        .contains("ledger"));
    }

    #[test]
    fn kubernetes_containers_are_labelled_as_the_kubelet_labels_them() {
        use crate::containers::runtime::{Identity, Kubernetes};
        let mut nginx = Metered::named(0, "shop_web-7d4f_nginx", "b1");
        nginx.identity = Identity {
            kubernetes: Some(Kubernetes {
                namespace: "shop".into(),
                pod: "web-7d4f".into(),
                container: "nginx".into(),
            }),
            image: Some("docker.io/library/nginx:1.27".into()),
        };
        let mut cache = Metered::named(1, "cache", "d1");
        cache.identity.image = Some("redis \"7\"".into());
        let text = prometheus(
            &[(Arc::new(nginx), sample()), (Arc::new(cache), sample())],
            &[],
            &OwnMetrics::default(),
            PrometheusNames::Cgmetric,
        );
        assert!(text.contains(
            "cgmetric_cpu_usage_seconds_total{container=\"nginx\",namespace=\"shop\",\
             pod=\"web-7d4f\",name=\"shop_web-7d4f_nginx\",id=\"b1\",\
             image=\"docker.io/library/nginx:1.27\",runtime=\"cgroup\"} 2.500001\n"
        ));
        // Not Kubernetes: no namespace or pod, the container label is the
        // directory name; an image is escaped as any label value.
        assert!(text.contains(
            "cgmetric_cpu_usage_seconds_total{container=\"cache\",name=\"cache\",id=\"d1\",\
             image=\"redis \\\"7\\\"\",runtime=\"cgroup\"} 2.500001\n"
        ));
    }

    #[test]
    fn cadvisor_names_units_labels_and_unset_limits() {
        use crate::containers::runtime::{Identity, Kubernetes};
        let mut app = Metered::named(0, "shop_api-1_app", "b1");
        app.identity = Identity {
            kubernetes: Some(Kubernetes {
                namespace: "shop".into(),
                pod: "api-1".into(),
                container: "app".into(),
            }),
            image: Some("shop/api:2".into()),
        };
        let mut s = sample();
        s.set(M::PidsCurrent, Some(3));
        s.set_value(M::PidsLimit, Value::Max);
        let text = prometheus(
            &[(Arc::new(app), s)],
            &[],
            &OwnMetrics {
                ebpf_health: Some([0, 0, 0]),
                ledger_write_errors: Some(0),
                ..OwnMetrics::default()
            },
            PrometheusNames::Cadvisor,
        );
        // cAdvisor's `id` is the cgroup path; there is no `runtime` label.
        let labels = "container=\"app\",namespace=\"shop\",pod=\"api-1\",\
                      name=\"shop_api-1_app\",id=\"/t/shop_api-1_app\",image=\"shop/api:2\"";
        for line in [
            "# TYPE container_cpu_usage_seconds_total counter\n".to_string(),
            format!("container_cpu_usage_seconds_total{{{labels},cpu=\"total\"}} 2.500001\n"),
            // cAdvisor writes an unset limit as 0.
            format!("container_spec_memory_limit_bytes{{{labels}}} 0\n"),
            format!("container_threads{{{labels}}} 3\n"),
            format!("container_threads_max{{{labels}}} 0\n"),
            // What cAdvisor has no family for keeps its own.
            format!("cgmetric_cpu_usage_cores{{{labels}}} 1.500\n"),
            "cgmetric_ebpf_uncounted_total{reason=\"traffic_map_full\"} 0\n".to_string(),
        ] {
            assert!(text.contains(&line), "{line}not in\n{text}");
        }
        assert!(!text.contains("cgmetric_cpu_usage_seconds_total"), "{text}");
        assert!(!text.contains("runtime="), "{text}");
    }

    #[test]
    fn classes_are_files_and_a_labelled_family() {
        let mut s = Sample::default();
        s.set(M::NetBytesTx, Some(30));
        s.classes = vec![
            crate::metrics::ClassBytes {
                class: "lan".into(),
                tx: 10,
                rx: 1,
            },
            crate::metrics::ClassBytes {
                class: "external".into(),
                tx: 20,
                rx: 2,
            },
        ];
        assert_eq!(
            container_metrics(&s),
            "net_bytes_tx 30\nnet_bytes_tx_lan 10\nnet_bytes_tx_external 20\n\
             net_bytes_rx_lan 1\nnet_bytes_rx_external 2\n"
        );
        let c = Arc::new(Metered::named(0, "web", "1"));
        let text = prometheus(
            &[(c, s)],
            &[],
            &OwnMetrics::default(),
            PrometheusNames::Cgmetric,
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("cgmetric_network_class_transmit_bytes_total{"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            line.contains("name=\"web\"") && line.ends_with(",class=\"lan\"} 10"),
            "{line}"
        );
        assert_eq!(
            text.matches("# TYPE cgmetric_network_class_receive_bytes_total counter")
                .count(),
            1
        );
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut out = "x=".to_string();
        write_escaped(&mut out, "a\"b\\c\nd");
        assert_eq!(out, "x=a\\\"b\\\\c\\nd");
    }
}
