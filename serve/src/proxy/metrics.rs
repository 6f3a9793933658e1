//! The proxy's `/metrics` page (Prometheus text format): per node, its
//! health, requests in flight, requests routed, failures and 429/5xx
//! answers; the requests no node could take, and the retries.

use std::fmt::Write;
use std::sync::Arc;

use super::nodes::Node;

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(nodes: &[Arc<Node>], unroutable: u64, retries: u64) -> String {
    let mut out = String::new();
    type Value = fn(&Node) -> f64;
    let per_node: [(&str, &str, &str, Value); 5] = [
        (
            "lmq_proxy_node_healthy",
            "gauge",
            "1 if the node passed its last health check and receives traffic.",
            |n| f64::from(u8::from(n.is_healthy())),
        ),
        (
            "lmq_proxy_node_outstanding",
            "gauge",
            "Requests in flight on the node through this proxy.",
            |n| n.outstanding() as f64,
        ),
        (
            "lmq_proxy_requests_routed_total",
            "counter",
            "Requests sent to the node (retries count again).",
            |n| n.routed() as f64,
        ),
        (
            "lmq_proxy_node_failures_total",
            "counter",
            "Requests whose node failed before answering.",
            |n| n.failures() as f64,
        ),
        (
            "lmq_proxy_node_rejections_total",
            "counter",
            "Requests the node answered 429 or 5xx (retried on another replica if one was left).",
            |n| n.rejections() as f64,
        ),
    ];
    for (name, kind, help, value) in per_node {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for n in nodes {
            let _ = writeln!(out, "{name}{{node=\"{}\"}} {}", label(&n.url), value(n));
        }
    }
    let _ = writeln!(out, "# HELP lmq_proxy_nodes Nodes registered.");
    let _ = writeln!(out, "# TYPE lmq_proxy_nodes gauge");
    let _ = writeln!(out, "lmq_proxy_nodes {}", nodes.len());
    let _ = writeln!(
        out,
        "# HELP lmq_proxy_requests_unroutable_total Requests answered 404 or 503 because no healthy node serves their model."
    );
    let _ = writeln!(out, "# TYPE lmq_proxy_requests_unroutable_total counter");
    let _ = writeln!(out, "lmq_proxy_requests_unroutable_total {unroutable}");
    let _ = writeln!(
        out,
        "# HELP lmq_proxy_retries_total Attempts on another replica after a node failed or answered 429/5xx."
    );
    let _ = writeln!(out, "# TYPE lmq_proxy_retries_total counter");
    let _ = writeln!(out, "lmq_proxy_retries_total {retries}");
    out
}
