//! The `lmq proxy --config proxy.yaml` format: the routing strategy, the
//! health-check interval, the admin key that guards `/nodes/*`, and the
//! nodes to route to.
//!
//! ```yaml
//! strategy: least_outstanding        # or random, min_observed_latency
//! health_check_interval_s: 5
//! admin_key: change-me               # without it /nodes/* answer 403
//! nodes:
//!   - url: http://127.0.0.1:23401
//!   - url: http://gpu-node-2:23333
//!     models: [llama-3-8b-awq]       # else discovered from /v1/models
//!     weight: 2                      # for `random`
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::ServeError;

/// How a request picks among the healthy nodes that serve its model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The node with the fewest requests in flight through this proxy.
    #[default]
    LeastOutstanding,
    /// A random node, weighted by each node's `weight`.
    Random,
    /// The node with the lowest moving average of observed latency.
    MinObservedLatency,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::LeastOutstanding => "least_outstanding",
            Strategy::Random => "random",
            Strategy::MinObservedLatency => "min_observed_latency",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default = "default_interval")]
    pub health_check_interval_s: f64,
    pub admin_key: Option<String>,
    #[serde(default)]
    pub nodes: Vec<NodeEntry>,
}

fn default_interval() -> f64 {
    5.0
}

/// One node: an `lmq serve` (or any OpenAI-compatible server).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// `http://host:port`, without a path.
    pub url: String,
    /// The models it serves; when absent they are read from its
    /// `/v1/models` at every health check.
    pub models: Option<Vec<String>>,
    /// Relative share of traffic under the `random` strategy (default 1).
    pub weight: Option<f64>,
    /// Sent as `Authorization: Bearer KEY` when discovering models on a
    /// node started with `--api-key`; client requests carry their own.
    pub api_key: Option<String>,
}

impl ProxyConfig {
    /// Reads and checks a proxy config file.
    pub fn from_path(path: &Path) -> Result<Self, ServeError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServeError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ServeError::Config {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses and checks the YAML text; errors name the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut config: ProxyConfig = yaml_serde::from_str(text).map_err(|e| e.to_string())?;
        if !(config.health_check_interval_s > 0.0 && config.health_check_interval_s.is_finite()) {
            return Err(format!(
                "health_check_interval_s must be a positive number of seconds; got {}",
                config.health_check_interval_s
            ));
        }
        if config
            .admin_key
            .as_deref()
            .is_some_and(|k| k.trim().is_empty())
        {
            return Err("admin_key is empty; remove it or give a key".into());
        }
        if config.nodes.is_empty() && config.admin_key.is_none() {
            return Err(
                "nodes lists no node, and without admin_key none can be added at run time".into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, node) in config.nodes.iter_mut().enumerate() {
            node.check().map_err(|e| format!("nodes[{i}].{e}"))?;
            if !seen.insert(node.url.clone()) {
                return Err(format!("nodes[{i}].url: {} is listed twice", node.url));
            }
        }
        Ok(config)
    }

    pub fn health_interval(&self) -> Duration {
        Duration::from_secs_f64(self.health_check_interval_s)
    }
}

impl NodeEntry {
    /// Validates the entry and normalizes its URL (no trailing slash).
    /// The error starts with the field's name.
    pub fn check(&mut self) -> Result<(), String> {
        self.url = normalize_url(&self.url).map_err(|e| format!("url: {e}"))?;
        if let Some(models) = &self.models {
            if models.is_empty() {
                return Err("models: empty list; leave it out to discover the models".into());
            }
            if let Some(k) = models.iter().position(|m| m.trim().is_empty()) {
                return Err(format!("models[{k}] is empty"));
            }
        }
        if let Some(w) = self.weight {
            if !(w > 0.0 && w.is_finite()) {
                return Err(format!("weight must be a positive number; got {w}"));
            }
        }
        if self.api_key.as_deref().is_some_and(|k| k.is_empty()) {
            return Err("api_key is empty".into());
        }
        Ok(())
    }
}

/// `http://host:port[/]` → `http://host:port`. Only plain HTTP: the proxy
/// has no TLS client, so an `https` node would fail on every request.
pub fn normalize_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim().trim_end_matches('/');
    let uri: axum::http::Uri = trimmed
        .parse()
        .map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "{url:?}: scheme `{other}` is not supported; use http://"
            ))
        }
        None => return Err(format!("{url:?} needs a scheme, e.g. http://{trimmed}")),
    }
    if uri.authority().is_none() {
        return Err(format!("{url:?} has no host"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!("{url:?} has a path; give only http://host:port"));
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_and_names_bad_fields() {
        let c = ProxyConfig::parse(
            "strategy: random\nhealth_check_interval_s: 0.5\nadmin_key: k\nnodes:\n  - url: http://127.0.0.1:1/\n  - url: http://h:2\n    models: [a, b]\n    weight: 2\n",
        )
        .unwrap();
        assert_eq!(c.strategy, Strategy::Random);
        assert_eq!(c.nodes[0].url, "http://127.0.0.1:1");
        assert_eq!(
            c.nodes[1].models.as_deref(),
            Some(&["a".to_string(), "b".into()][..])
        );
        let c = ProxyConfig::parse("nodes:\n  - url: http://a:1\n").unwrap();
        assert_eq!(c.strategy, Strategy::LeastOutstanding);
        assert_eq!(c.health_check_interval_s, 5.0);

        let bad = |text: &str, needle: &str| {
            let e = ProxyConfig::parse(text).unwrap_err();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
        };
        bad(
            "strategy: fastest\nnodes:\n  - url: http://a:1\n",
            "fastest",
        );
        bad("nodes:\n  - url: http://a:1\n    modles: [x]\n", "modles");
        bad("nodes:\n  - url: a:1\n", "nodes[0].url");
        bad("nodes:\n  - url: https://a:1\n", "nodes[0].url");
        bad("nodes:\n  - url: http://a:1/v1\n", "path");
        bad(
            "nodes:\n  - url: http://a:1\n  - url: http://a:1/\n",
            "twice",
        );
        bad(
            "nodes:\n  - url: http://a:1\n    weight: 0\n",
            "nodes[0].weight",
        );
        bad(
            "health_check_interval_s: 0\nnodes:\n  - url: http://a:1\n",
            "health_check_interval_s",
        );
        bad("nodes: []\n", "admin_key");
        bad("admin_key: ''\nnodes:\n  - url: http://a:1\n", "admin_key");
    }
}
