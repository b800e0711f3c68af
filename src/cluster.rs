//! Several nodes (RFC 9725 §4.5 redirects): a node that is not the best
//! place for a new publication answers `307` with the WHIP URL of the node
//! that is. Two rules, in order: a configured route for the stream's name
//! (a regional balancer, a dedicated node), then the least-loaded peer,
//! when its load (sessions / max_sessions, polled at `/cluster/load`) is
//! lower than this node's. A redirected request is never redirected again,
//! so two nodes with stale views of each other cannot bounce an offer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::auth::stream_matches;
use crate::config::{ClusterConfig, ClusterRoute};
use crate::streams::lock;

/// Added to the URL of a redirect: the receiving node keeps the offer.
pub const REDIRECTED_QUERY: &str = "redirected=1";

/// A node's load, as `/cluster/load` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    pub sessions: usize,
    pub max_sessions: usize,
}

impl Load {
    fn ratio(self) -> f64 {
        self.sessions as f64 / self.max_sessions.max(1) as f64
    }

    fn full(self) -> bool {
        self.sessions >= self.max_sessions
    }
}

struct Peer {
    base: String,
    /// Last load polled; `None` while the peer does not answer.
    load: Mutex<Option<Load>>,
}

pub struct Cluster {
    peers: Vec<Peer>,
    routes: Vec<ClusterRoute>,
    poll_interval: Duration,
}

impl Cluster {
    pub fn new(config: &ClusterConfig) -> Arc<Self> {
        Arc::new(Self {
            peers: config
                .peers
                .iter()
                .map(|p| Peer {
                    base: p.trim_end_matches('/').to_owned(),
                    load: Mutex::new(None),
                })
                .collect(),
            routes: config.routes.clone(),
            poll_interval: Duration::from_secs_f64(config.poll_interval.max(0.1)),
        })
    }

    /// Where an offer for `stream` should go instead of here, if anywhere.
    /// `redirected`: the request came through a redirect already.
    pub fn redirect(&self, stream: &str, own: Load, redirected: bool) -> Option<String> {
        if redirected {
            return None;
        }
        if let Some(r) = self
            .routes
            .iter()
            .find(|r| stream_matches(&r.pattern, stream))
        {
            return Some(with_query(&r.url.replace("{stream}", stream)));
        }
        let loads: Vec<Option<Load>> = self.peers.iter().map(|p| *lock(&p.load)).collect();
        let i = least_loaded(own, &loads)?;
        let peer = &self.peers[i];
        // Count the publisher we send there until the next poll says more,
        // so a burst of offers does not all go to the same peer.
        if let Some(l) = lock(&peer.load).as_mut() {
            l.sessions += 1;
        }
        Some(with_query(&format!("{}/whip/{stream}", peer.base)))
    }

    /// Polls every peer's load until `shutdown`.
    pub fn spawn_polling(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.peers.is_empty() {
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(cluster.poll_interval.max(Duration::from_millis(500)))
                .build()
                .unwrap_or_default();
            let mut tick = tokio::time::interval(cluster.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                let mut polls = tokio::task::JoinSet::new();
                for i in 0..cluster.peers.len() {
                    let (c, http) = (cluster.clone(), http.clone());
                    polls.spawn(async move { poll(&http, &c.peers[i]).await });
                }
                polls.join_all().await;
            }
        });
    }
}

async fn poll(http: &reqwest::Client, peer: &Peer) {
    let url = format!("{}/cluster/load", peer.base);
    let load = match http.get(&url).send().await {
        Ok(r) if r.status().is_success() => r.json::<Load>().await.ok(),
        _ => None,
    };
    let mut current = lock(&peer.load);
    if current.is_some() != load.is_some() {
        match load {
            Some(_) => tracing::info!(peer = %peer.base, "cluster peer is up"),
            None => tracing::warn!(peer = %peer.base, "cluster peer does not answer"),
        }
    }
    *current = load;
}

fn with_query(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{REDIRECTED_QUERY}")
}

/// The peer to send a publisher to: the lowest load ratio among peers that
/// answer and have room, if lower than ours. Ties stay here.
fn least_loaded(own: Load, peers: &[Option<Load>]) -> Option<usize> {
    let (i, best) = peers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.filter(|l| !l.full()).map(|l| (i, l)))
        .min_by(|a, b| a.1.ratio().total_cmp(&b.1.ratio()))?;
    (best.ratio() < own.ratio()).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(sessions: usize, max_sessions: usize) -> Option<Load> {
        Some(Load {
            sessions,
            max_sessions,
        })
    }

    #[test]
    fn least_loaded_peer_by_ratio_only_when_lower() {
        let own = Load {
            sessions: 5,
            max_sessions: 10,
        };
        assert_eq!(least_loaded(own, &[load(4, 10), load(10, 100)]), Some(1));
        // Equal: stay.
        assert_eq!(least_loaded(own, &[load(5, 10)]), None);
        // Down or full peers are skipped.
        assert_eq!(least_loaded(own, &[None, load(1, 1), load(2, 10)]), Some(2));
        assert_eq!(least_loaded(own, &[]), None);
    }

    fn cluster(peers: &[&str], routes: &[(&str, &str)]) -> Arc<Cluster> {
        Cluster::new(&ClusterConfig {
            peers: peers.iter().map(|s| s.to_string()).collect(),
            poll_interval: 1.0,
            routes: routes
                .iter()
                .map(|(p, u)| ClusterRoute {
                    pattern: p.to_string(),
                    url: u.to_string(),
                })
                .collect(),
        })
    }

    #[test]
    fn routes_first_then_peers_and_never_twice() {
        let c = cluster(
            &["http://b:8080/"],
            &[("eu-*", "https://eu.example.com/whip/{stream}")],
        );
        let own = Load {
            sessions: 1,
            max_sessions: 10,
        };
        assert_eq!(
            c.redirect("eu-cam", own, false).as_deref(),
            Some("https://eu.example.com/whip/eu-cam?redirected=1")
        );
        // The peer's load is unknown yet: stay.
        assert_eq!(c.redirect("cam", own, false), None);
        *lock(&c.peers[0].load) = load(0, 10);
        assert_eq!(
            c.redirect("cam", own, false).as_deref(),
            Some("http://b:8080/whip/cam?redirected=1")
        );
        // That publisher now counts on b: 1/10 each, so the next stays.
        assert_eq!(c.redirect("cam2", own, false), None);
        assert_eq!(c.redirect("eu-cam", own, true), None);
    }
}
