//! Text formats: one value a file, `metrics` (one container), `metric` (all
//! containers, the `/proc/metric` format of cgmetric's predecessor) and
//! `metrics.prom` (Prometheus text exposition format).

use std::fmt::Write;
use std::sync::Arc;

use crate::containers::registry::Metered;
use crate::metrics::{ClassMetricDef, MetricDef, Sample, Scale, Value, CLASS_METRICS, METRICS};

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
/// catalogue row, HELP and TYPE once, a `container`, `id` and `runtime`
/// label on every series, no timestamps.
///
/// The containers that ended lately (`exited`) keep their series, with the
/// labels they had, so that each series goes on to its final value. Should
/// a live container have the very same labels (a runtime restarted the
/// same container), the ended one's series add `state="exited"`.
pub fn prometheus(
    live: &[(Arc<Metered>, Sample)],
    exited: &[(Arc<Metered>, Sample)],
    ebpf_health: Option<[u64; 3]>,
    ledger_write_errors: Option<u64>,
) -> String {
    // Each container's labels are escaped once, not once a series.
    let mut labels: Vec<String> = live.iter().map(|(c, _)| label_set(c)).collect();
    let taken: std::collections::HashSet<String> = labels.iter().cloned().collect();
    for (c, _) in exited {
        let mut set = label_set(c);
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
        family_header(&mut out, def);
        for (labels, value) in series {
            out.push_str("cgmetric_");
            out.push_str(def.prom);
            out.push('{');
            out.push_str(labels);
            out.push_str("} ");
            write_prom_value(&mut out, value, def.scale);
            out.push('\n');
        }
    }
    for def in &CLASS_METRICS {
        class_family(&mut out, def, samples.iter().map(|(_, s)| s).zip(&labels));
    }
    if let Some(health) = ebpf_health {
        ebpf_health_family(&mut out, health);
    }
    if let Some(errors) = ledger_write_errors {
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

fn family_header(out: &mut String, def: &MetricDef) {
    let kind = match def.kind {
        crate::metrics::PromType::Counter => "counter",
        crate::metrics::PromType::Gauge => "gauge",
    };
    let _ = writeln!(out, "# HELP cgmetric_{} {}", def.prom, def.help);
    let _ = writeln!(out, "# TYPE cgmetric_{} {kind}", def.prom);
}

/// `container="…",id="…",runtime="…"`, escaped.
fn label_set(container: &Metered) -> String {
    let mut out = String::new();
    for (name, value) in [
        ("container", container.name.as_str()),
        ("id", container.id.as_str()),
        ("runtime", container.runtime),
    ] {
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
        let text = prometheus(&live, &exited, None, Some(3));
        let series =
            |labels: &str| format!("cgmetric_cpu_usage_seconds_total{{{labels}}} 2.500001\n");
        assert!(text.contains(&series("container=\"web\",id=\"1\",runtime=\"cgroup\"")));
        assert!(text.contains(&series(
            "container=\"web\",id=\"1\",runtime=\"cgroup\",state=\"exited\""
        )));
        assert!(text.contains(&series("container=\"job\",id=\"2\",runtime=\"cgroup\"")));
        assert_eq!(text.matches("cgmetric_cpu_usage_seconds_total{").count(), 3);
        assert_eq!(
            text.matches("# TYPE cgmetric_cpu_usage_seconds_total counter\n")
                .count(),
            1
        );
        assert!(text.ends_with("cgmetric_ledger_write_errors_total 3\n"));
        assert!(!prometheus(&live, &[], None, None).contains("ledger"));
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
        let text = prometheus(&[(c, s)], &[], None, None);
        assert!(text.contains(
            "cgmetric_network_class_transmit_bytes_total{container=\"web\",id=\"1\",\
             runtime=\"cgroup\",class=\"lan\"} 10\n"
        ));
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
