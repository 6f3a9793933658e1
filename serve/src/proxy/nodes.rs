//! The node registry: each node's models, health, requests in flight and
//! observed latency, and the strategies that pick a node for a request.
//!
//! Invariants:
//! - Only healthy nodes are picked. A node turns unhealthy when a health
//!   check or a request to it fails, and healthy again only through a
//!   successful health check.
//! - `outstanding` counts requests through this proxy whose response has
//!   not finished; the [`InFlight`] guard that the response body owns
//!   decrements it, so a client that disconnects releases it too.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};

use super::config::{NodeEntry, Strategy};

/// Weight of the newest sample in the latency moving average.
const EWMA_ALPHA: f64 = 0.3;

pub struct Node {
    pub url: String,
    pub weight: f64,
    /// Models from the config or `/nodes/add`; `None` means discover.
    pub fixed_models: Option<Vec<String>>,
    pub api_key: Option<String>,
    state: Mutex<NodeState>,
    outstanding: AtomicUsize,
    routed: AtomicU64,
    failures: AtomicU64,
    rejections: AtomicU64,
}

#[derive(Default)]
struct NodeState {
    healthy: bool,
    models: Vec<String>,
    /// Moving average of the time to the node's response headers, in
    /// seconds; `None` until a request has been observed.
    latency: Option<f64>,
    /// Why the last check or request failed, for `/nodes/status`.
    last_error: Option<String>,
}

impl Node {
    pub fn new(entry: &NodeEntry) -> Node {
        Node {
            url: entry.url.clone(),
            weight: entry.weight.unwrap_or(1.0),
            fixed_models: entry.models.clone(),
            api_key: entry.api_key.clone(),
            state: Mutex::new(NodeState {
                models: entry.models.clone().unwrap_or_default(),
                ..Default::default()
            }),
            outstanding: AtomicUsize::new(0),
            routed: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            rejections: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, NodeState> {
        // The state is plain data that stays consistent even if a holder
        // panicked, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_healthy(&self) -> bool {
        self.state().healthy
    }

    pub fn models(&self) -> Vec<String> {
        self.state().models.clone()
    }

    fn serves(&self, model: &str) -> bool {
        let s = self.state();
        s.healthy && s.models.iter().any(|m| m == model)
    }

    /// Records a successful health check (and the models found).
    pub fn mark_healthy(&self, models: Vec<String>) {
        let mut s = self.state();
        s.healthy = true;
        s.models = models;
        s.last_error = None;
    }

    /// Takes the node out of routing until a health check succeeds.
    pub fn mark_unhealthy(&self, why: String) {
        let mut s = self.state();
        s.healthy = false;
        s.last_error = Some(why);
    }

    /// Counts a request whose node failed before answering.
    pub fn record_failure(&self, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.mark_unhealthy(why);
    }

    /// Counts a 429/5xx answer. The node stays in routing: it answers,
    /// and its health check decides whether it is down.
    pub fn record_rejection(&self) {
        self.rejections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_latency(&self, elapsed: Duration) {
        let sample = elapsed.as_secs_f64();
        let mut s = self.state();
        s.latency = Some(match s.latency {
            Some(avg) => avg + EWMA_ALPHA * (sample - avg),
            None => sample,
        });
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub fn routed(&self) -> u64 {
        self.routed.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn rejections(&self) -> u64 {
        self.rejections.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> Value {
        let s = self.state();
        json!({
            "url": self.url,
            "healthy": s.healthy,
            "models": s.models,
            "models_discovered": self.fixed_models.is_none(),
            "weight": self.weight,
            "outstanding": self.outstanding(),
            "requests_routed": self.routed(),
            "failures": self.failures(),
            "rejections": self.rejections(),
            "latency_ewma_s": s.latency,
            "last_error": s.last_error,
        })
    }
}

/// A request in flight on a node; dropping it (response finished or
/// abandoned) releases the node's count.
pub struct InFlight(Arc<Node>);

impl InFlight {
    pub fn new(node: Arc<Node>) -> InFlight {
        node.outstanding.fetch_add(1, Ordering::Relaxed);
        node.routed.fetch_add(1, Ordering::Relaxed);
        InFlight(node)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The set of nodes, changed at run time by `/nodes/add` and
/// `/nodes/remove`.
#[derive(Default)]
pub struct Registry {
    nodes: RwLock<Vec<Arc<Node>>>,
    /// Rotates ties under `least_outstanding` so equal nodes share load.
    turn: AtomicUsize,
}

impl Registry {
    pub fn new(nodes: Vec<Arc<Node>>) -> Registry {
        Registry {
            nodes: RwLock::new(nodes),
            turn: AtomicUsize::new(0),
        }
    }

    pub fn all(&self) -> Vec<Arc<Node>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Adds a node unless one with its URL is registered; false if so.
    pub fn add(&self, node: Arc<Node>) -> bool {
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        if nodes.iter().any(|n| n.url == node.url) {
            return false;
        }
        nodes.push(node);
        true
    }

    /// Removes the node with `url`; false if none. Requests in flight on
    /// it finish: they hold their own reference.
    pub fn remove(&self, url: &str) -> bool {
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        let before = nodes.len();
        nodes.retain(|n| n.url != url);
        nodes.len() != before
    }

    /// Every model some healthy node serves, sorted, without repeats.
    pub fn available_models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .all()
            .iter()
            .filter(|n| n.is_healthy())
            .flat_map(|n| n.models())
            .collect();
        models.sort();
        models.dedup();
        models
    }

    /// Whether any node, healthy or not, is known to serve `model`.
    pub fn knows(&self, model: &str) -> bool {
        self.all()
            .iter()
            .any(|n| n.models().iter().any(|m| m == model))
    }

    /// Picks a healthy node serving `model`, skipping `tried` (nodes that
    /// already failed this request).
    pub fn pick(&self, model: &str, strategy: Strategy, tried: &[String]) -> Option<Arc<Node>> {
        let candidates: Vec<Arc<Node>> = self
            .all()
            .into_iter()
            .filter(|n| n.serves(model) && !tried.contains(&n.url))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let index = match strategy {
            Strategy::LeastOutstanding => {
                let start = self.turn.fetch_add(1, Ordering::Relaxed) % candidates.len();
                (0..candidates.len())
                    .map(|k| (start + k) % candidates.len())
                    .min_by_key(|&i| candidates[i].outstanding())
                    .unwrap_or(0)
            }
            Strategy::Random => {
                let total: f64 = candidates.iter().map(|n| n.weight).sum();
                let mut x = rand::rng().random::<f64>() * total;
                let mut chosen = candidates.len() - 1;
                for (i, n) in candidates.iter().enumerate() {
                    if x < n.weight {
                        chosen = i;
                        break;
                    }
                    x -= n.weight;
                }
                chosen
            }
            Strategy::MinObservedLatency => {
                // A node never observed counts as fastest, so each node
                // gets measured before the average decides.
                let latency = |n: &Node| n.state().latency.unwrap_or(0.0);
                (0..candidates.len())
                    .min_by(|&a, &b| latency(&candidates[a]).total_cmp(&latency(&candidates[b])))
                    .unwrap_or(0)
            }
        };
        Some(candidates[index].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(url: &str, models: &[&str], weight: f64) -> Arc<Node> {
        let n = Arc::new(Node::new(&NodeEntry {
            url: url.into(),
            models: Some(models.iter().map(|m| m.to_string()).collect()),
            weight: Some(weight),
            api_key: None,
        }));
        n.mark_healthy(models.iter().map(|m| m.to_string()).collect());
        n
    }

    #[test]
    fn strategies_pick_healthy_nodes_serving_the_model() {
        let a = node("http://a", &["x", "y"], 1.0);
        let b = node("http://b", &["x"], 3.0);
        let r = Registry::new(vec![a.clone(), b.clone()]);
        assert_eq!(r.available_models(), ["x", "y"]);

        // least_outstanding: a busy node loses; ties alternate.
        let busy = InFlight::new(a.clone());
        for _ in 0..4 {
            let n = r.pick("x", Strategy::LeastOutstanding, &[]).unwrap();
            assert_eq!(n.url, "http://b");
        }
        drop(busy);
        let picks: Vec<String> = (0..4)
            .map(|_| {
                r.pick("x", Strategy::LeastOutstanding, &[])
                    .unwrap()
                    .url
                    .clone()
            })
            .collect();
        assert!(picks.contains(&"http://a".to_string()) && picks.contains(&"http://b".to_string()));

        // random is weighted 1:3.
        let b_count = (0..4000)
            .filter(|_| r.pick("x", Strategy::Random, &[]).unwrap().url == "http://b")
            .count();
        assert!((2700..3300).contains(&b_count), "{b_count}");

        // min_observed_latency prefers the faster average.
        a.observe_latency(Duration::from_millis(50));
        b.observe_latency(Duration::from_millis(10));
        assert_eq!(
            r.pick("x", Strategy::MinObservedLatency, &[]).unwrap().url,
            "http://b"
        );

        // Failed and tried nodes are skipped; y only lives on a.
        assert_eq!(
            r.pick("x", Strategy::Random, &["http://b".into()])
                .unwrap()
                .url,
            "http://a"
        );
        a.record_failure("refused".into());
        assert!(r.pick("y", Strategy::LeastOutstanding, &[]).is_none());
        assert!(r.knows("y"));
        assert_eq!(r.available_models(), ["x"]);
        assert_eq!(a.failures(), 1);

        assert!(!r.add(node("http://a", &["z"], 1.0)));
        assert!(r.remove("http://a"));
        assert!(!r.remove("http://a"));
        assert!(!r.knows("y"));
    }
}
