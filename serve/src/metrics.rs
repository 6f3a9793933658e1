//! Prometheus metrics: latency histograms and request outcomes recorded by
//! the server, plus the engine's own counters read at scrape time. Every
//! series carries a `model` label.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use lmq_turbomind::engine::EngineStats;

/// Bucket upper bounds in seconds, shared by the three histograms: from a
/// fast GPU step to a long generation on a CPU.
const BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Default)]
struct HistogramData {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// A cumulative histogram of durations.
#[derive(Default)]
pub struct Histogram(Mutex<HistogramData>);

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let seconds = d.as_secs_f64();
        // A poisoned lock only means another observer panicked mid-update;
        // the counts are still usable.
        let mut h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
            h.counts[i] += 1;
        }
        h.sum += seconds;
        h.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, model: &str) {
        let h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(h.counts.iter()) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{model=\"{model}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {}", h.count);
    }
}

/// How a request choice ended, for `lmq_requests_total`.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Stop,
    Length,
    /// The client went away first.
    Cancelled,
    Failed,
}

const OUTCOMES: [(Outcome, &str); 4] = [
    (Outcome::Stop, "stop"),
    (Outcome::Length, "length"),
    (Outcome::Cancelled, "cancelled"),
    (Outcome::Failed, "failed"),
];

/// What the server records for one model.
#[derive(Default)]
pub struct ModelMetrics {
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    outcomes: [AtomicU64; 4],
}

impl ModelMetrics {
    pub fn count(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Escapes a label value as the text format requires.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The whole `/metrics` page for `(served name, engine stats, metrics)`.
pub fn render(models: &[(&str, EngineStats, &ModelMetrics)]) -> String {
    let mut out = String::new();
    type Gauge = fn(&EngineStats) -> f64;
    let gauges: [(&str, &str, &str, Gauge); 10] = [
        (
            "lmq_requests_running",
            "gauge",
            "Requests being computed.",
            |s| s.running as f64,
        ),
        (
            "lmq_requests_waiting",
            "gauge",
            "Requests queued for admission.",
            |s| s.waiting as f64,
        ),
        (
            "lmq_kv_blocks_total",
            "gauge",
            "KV-cache blocks in the pool.",
            |s| s.kv_blocks_total as f64,
        ),
        (
            "lmq_kv_blocks_used",
            "gauge",
            "KV-cache blocks held by requests.",
            |s| s.kv_blocks_used as f64,
        ),
        (
            "lmq_kv_blocks_cached",
            "gauge",
            "Unreferenced KV-cache blocks kept for prefix reuse (evictable).",
            |s| s.kv_blocks_cached as f64,
        ),
        (
            "lmq_kv_blocks_free",
            "gauge",
            "KV-cache blocks neither used nor cached.",
            |s| {
                s.kv_blocks_total
                    .saturating_sub(s.kv_blocks_used + s.kv_blocks_cached) as f64
            },
        ),
        (
            "lmq_prefix_cache_hit_rate",
            "gauge",
            "Prompt tokens served from the prefix cache over all prompt tokens.",
            |s| {
                if s.prompt_tokens == 0 {
                    0.0
                } else {
                    s.prefix_cached_tokens as f64 / s.prompt_tokens as f64
                }
            },
        ),
        (
            "lmq_prompt_tokens_total",
            "counter",
            "Prompt tokens submitted.",
            |s| s.prompt_tokens as f64,
        ),
        (
            "lmq_generation_tokens_total",
            "counter",
            "Tokens generated.",
            |s| s.generation_tokens as f64,
        ),
        (
            "lmq_preemptions_total",
            "counter",
            "Requests preempted for KV-cache space.",
            |s| s.preemptions as f64,
        ),
    ];
    for (name, kind, help, get) in gauges {
        header(&mut out, name, kind, help);
        for (model, stats, _) in models {
            let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", label(model), get(stats));
        }
    }
    type Pick = fn(&ModelMetrics) -> &Histogram;
    let histograms: [(&str, &str, Pick); 3] = [
        (
            "lmq_time_to_first_token_seconds",
            "Time from submission to the first token.",
            |m| &m.ttft,
        ),
        (
            "lmq_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            |m| &m.tpot,
        ),
        (
            "lmq_e2e_request_latency_seconds",
            "Time from receiving a request to its last token.",
            |m| &m.e2e,
        ),
    ];
    for (name, help, get) in histograms {
        header(&mut out, name, "histogram", help);
        for (model, _, metrics) in models {
            get(metrics).render(&mut out, name, &label(model));
        }
    }
    header(
        &mut out,
        "lmq_requests_total",
        "counter",
        "Completed choices by how they ended.",
    );
    for (model, _, metrics) in models {
        for (outcome, reason) in OUTCOMES {
            let n = metrics.outcomes[outcome as usize].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "lmq_requests_total{{model=\"{}\",reason=\"{reason}\"}} {n}",
                label(model)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let m = ModelMetrics::default();
        m.ttft.observe(Duration::from_millis(3));
        m.ttft.observe(Duration::from_millis(30));
        m.count(Outcome::Cancelled);
        let stats = EngineStats {
            kv_blocks_total: 10,
            kv_blocks_used: 2,
            ..Default::default()
        };
        let page = render(&[("a\"b", stats, &m)]);
        assert!(
            page.contains(
                "lmq_time_to_first_token_seconds_bucket{model=\"a\\\"b\",le=\"0.005\"} 1"
            ),
            "{page}"
        );
        assert!(
            page.contains("lmq_time_to_first_token_seconds_bucket{model=\"a\\\"b\",le=\"0.05\"} 2")
        );
        assert!(page.contains("lmq_time_to_first_token_seconds_count{model=\"a\\\"b\"} 2"));
        assert!(page.contains("lmq_kv_blocks_free{model=\"a\\\"b\"} 8"));
        assert!(page.contains("lmq_requests_total{model=\"a\\\"b\",reason=\"cancelled\"} 1"));
    }
}
