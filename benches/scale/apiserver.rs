//! The apiserver's own view: request counts and latency histograms from its /metrics.
//!
//! Lives here: [`ApiSample`] (a scrape through kubectl) and the differences between two samples.
//! Must not live here: counting what the bench's watch sees (`store`).

use crate::{report::ms, support::kube::kubectl};

/// What the apiserver's own /metrics say about writes to dbpools/status.
#[derive(Clone, Debug, Default)]
pub struct ApiSample {
    /// PATCH/APPLY requests on dbpools/status.
    pub status_requests: f64,
    /// GET requests on secrets.
    pub secret_gets: f64,
    /// Cumulative histogram of their latency: (upper bound in seconds, count).
    pub latency: Vec<(f64, f64)>,
}

/// Scrapes the apiserver's /metrics (through kubectl); `None` when that fails.
pub async fn apiserver_sample() -> Option<ApiSample> {
    let out = kubectl(["get", "--raw", "/metrics"]).await;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut sample = ApiSample::default();
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    let ours = |l: &str| {
        l.contains("resource=\"dbpools\"")
            && l.contains("subresource=\"status\"")
            && (l.contains("verb=\"APPLY\"") || l.contains("verb=\"PATCH\""))
    };
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        if line.contains("resource=\"secrets\"")
            && line.contains("verb=\"GET\"")
            && let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
        {
            sample.secret_gets += value;
        }
    }
    for line in text.lines().filter(|l| ours(l)) {
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if line.starts_with("apiserver_request_total{") {
            sample.status_requests += value;
        } else if line.starts_with("apiserver_request_duration_seconds_bucket{") {
            let le = line
                .split("le=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map(|v| {
                    if v == "+Inf" {
                        f64::INFINITY
                    } else {
                        v.parse().unwrap_or(f64::NAN)
                    }
                });
            if let Some(le) = le.filter(|le| !le.is_nan()) {
                match buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, count)) => *count += value,
                    None => buckets.push((le, value)),
                }
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    sample.latency = buckets;
    Some(sample)
}

/// "p50 ≤ x ms · p99 ≤ y ms (n=…)" of the status writes between two samples, from the
/// apiserver's latency histogram (bucket upper bounds).
pub fn apiserver_latency(before: &Option<ApiSample>, after: &Option<ApiSample>) -> String {
    let (Some(before), Some(after)) = (before, after) else {
        return "n/a".to_owned();
    };
    let delta: Vec<(f64, f64)> = after
        .latency
        .iter()
        .map(|(le, count)| {
            let old = before
                .latency
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, count - old)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, c)| *c);
    if total <= 0.0 {
        return "no writes".to_owned();
    }
    let quantile = |q: f64| {
        delta
            .iter()
            .find(|(_, c)| *c >= q * total)
            .map_or(f64::INFINITY, |(le, _)| *le * 1000.0)
    };
    format!(
        "p50 ≤ {} · p99 ≤ {} (n={total:.0})",
        ms(quantile(0.5)),
        ms(quantile(0.99))
    )
}

/// Status requests counted by the apiserver between two samples, or "n/a".
pub fn request_delta(before: &Option<ApiSample>, after: &Option<ApiSample>) -> String {
    match (before, after) {
        (Some(a), Some(b)) => format!("{:.0}", b.status_requests - a.status_requests),
        _ => "n/a".to_owned(),
    }
}
