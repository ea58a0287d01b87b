//! Where Redis is and what the client knows of it: `[redis]` turned into fred's configuration
//! (topology, credentials, database, TLS), and the topology as fred sees it now.

use std::sync::Arc;

use fred::clients::Pool;
use fred::interfaces::{ClientLike, ClusterInterface};
use fred::types::config::{
    ClusterDiscoveryPolicy, Config as FredConfig, Server, ServerConfig, TlsConfig, TlsConnector, TlsHostMapping,
};

use super::tracking::Node;
use crate::config::{RedisConfig, RedisNode, RedisTopology};
use crate::tls::{self, TlsError};

/// The topology in `/status` and the `sidecache_redis_*nodes` metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// `standalone`, `sentinel` or `cluster`.
    pub mode: &'static str,
    /// Whether connections use TLS.
    pub tls: bool,
    /// The servers requests go to: a cluster's primaries from its slot map, Sentinel's current
    /// master once connected, or the one configured server.
    pub nodes: Vec<String>,
    /// Servers with an open connection from any of the store's clients.
    pub connected_nodes: usize,
}

/// How to reach Redis: fred's configuration, built once from `[redis]` and shared by the cache's
/// and the limiter's stores. TLS files are loaded here, so a bad one fails start-up with its field
/// named; reaching Redis never does.
#[derive(Clone)]
pub struct RedisTarget {
    pub(super) fred: FredConfig,
    pub(super) config: RedisConfig,
    /// The TLS client settings fred uses, for the invalidation links.
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
}

impl RedisTarget {
    /// Topology, credentials, database and TLS from the validated `[redis]`.
    pub fn new(config: &RedisConfig) -> Result<RedisTarget, TlsError> {
        let servers = |nodes: &[RedisNode]| nodes.iter().map(|n| Server::new(n.host.as_str(), n.port)).collect();
        let server = match &config.topology {
            RedisTopology::Standalone(node) => {
                ServerConfig::Centralized { server: Server::new(node.host.as_str(), node.port) }
            }
            RedisTopology::Sentinel { service, sentinels } => ServerConfig::Sentinel {
                hosts: servers(sentinels),
                service_name: service.clone(),
                username: config.sentinel_username.clone(),
                password: config.sentinel_password.clone(),
            },
            // Discovery may also use the last slot map, so the seeds being down is no outage.
            RedisTopology::Cluster { seeds } => {
                ServerConfig::Clustered { hosts: servers(seeds), policy: ClusterDiscoveryPolicy::UseCache }
            }
        };
        let client = config.tls.as_ref().map(tls::redis_client_config).transpose()?;
        let tls = client.as_ref().map(|client| TlsConfig {
            connector: TlsConnector::from(client.clone()),
            // A cluster's slot map may name nodes by IP address while their certificates
            // name the host the client was given (ElastiCache): verify those against the
            // host that answered. Host names in the map are kept as they are.
            hostnames: match config.topology {
                RedisTopology::Cluster { .. } => TlsHostMapping::DefaultHost,
                _ => TlsHostMapping::None,
            },
        });
        let fred = FredConfig {
            server,
            username: config.username.clone(),
            password: config.password.clone(),
            database: config.database,
            tls,
            // `true` would end fred's connection task at the first failed connect (Redis not up
            // yet at start-up) and never retry: the reconnect policy must cover the first
            // connection too. Requests never wait for it: the gate skips Redis while fred is
            // not connected.
            fail_fast: false,
            ..FredConfig::default()
        };
        Ok(RedisTarget { fred, config: config.clone(), tls: client.map(Arc::new) })
    }

    /// The primaries the clients of `pool` send commands to now: the configured server, Sentinel's
    /// master once connected, or a cluster's primaries from the slot map. Reads fred's state only.
    pub(super) fn primaries(&self, pool: &Pool) -> Vec<Node> {
        // fred has already chosen each cluster node's certificate name (`TlsHostMapping` above).
        let node = |s: &Server| Node {
            host: s.host.to_string(),
            port: s.port,
            tls_name: s.tls_server_name.as_ref().unwrap_or(&s.host).to_string(),
        };
        match &self.config.topology {
            RedisTopology::Standalone(n) => vec![Node { host: n.host.clone(), port: n.port, tls_name: n.host.clone() }],
            RedisTopology::Sentinel { .. } => {
                pool.clients().iter().flat_map(|c| c.active_connections()).map(|s| node(&s)).collect()
            }
            RedisTopology::Cluster { .. } => {
                let state = pool.clients().iter().find_map(|c| c.cached_cluster_state());
                state.map(|s| s.unique_primary_nodes().iter().map(node).collect()).unwrap_or_default()
            }
        }
    }

    /// What the clients of `pool` know now. Reads fred's state only: no command is sent.
    pub(super) fn topology(&self, pool: &Pool) -> Topology {
        let mut connected: Vec<String> =
            pool.clients().iter().flat_map(|c| c.active_connections()).map(|s| s.to_string()).collect();
        connected.sort();
        connected.dedup();
        let nodes = match &self.config.topology {
            RedisTopology::Cluster { .. } => {
                let state = pool.clients().iter().find_map(|c| c.cached_cluster_state());
                let mut primaries: Vec<String> =
                    state.map(|s| s.unique_primary_nodes().iter().map(|s| s.to_string()).collect()).unwrap_or_default();
                primaries.sort();
                primaries
            }
            RedisTopology::Sentinel { .. } => connected.clone(),
            RedisTopology::Standalone(node) => vec![node.to_string()],
        };
        Topology {
            mode: self.config.topology.mode(),
            tls: self.config.tls.is_some(),
            nodes,
            connected_nodes: connected.len(),
        }
    }
}
