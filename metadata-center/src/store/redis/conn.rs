//! The connection to Redis: one server through the client's `ConnectionManager` (one
//! multiplexed connection, reconnected in the background after an error), or a Redis Cluster
//! through the cluster client (slot map refreshed on MOVED and on errors, so a promoted replica
//! takes over). Both are created lazily: the server starts, and answers from nothing, while
//! Redis is down. A connection attempt (DNS included) is bounded by `connect_timeout`; a
//! response, by the store's deadline on each operation as a whole (`RedisStore::run`), and for
//! the cluster client also by `op_timeout` inside it (it retries on a node's silence).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value};

use super::super::StoreSpec;

/// A cheap, cloneable handle on the Redis connection (each operation clones it).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Connects lazily (nothing is awaited here; the first operations fail until Redis
    /// answers). Must be called within a tokio runtime.
    pub fn open(
        spec: &StoreSpec,
        connect_timeout: Duration,
        op_timeout: Duration,
    ) -> Result<Conn, String> {
        match spec {
            StoreSpec::Redis(url) => {
                let client = redis::Client::open(no_delay(url)?).map_err(|e| e.to_string())?;
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    // No response timer of the client's own: every call is already under the
                    // store's deadline (`RedisStore::run`), and each timer armed costs the
                    // runtime a wake-up of its I/O driver (an eventfd write per call, measured
                    // in docs/benchmarks.md).
                    .set_response_timeout(None)
                    // Reconnect attempts back off from 50 ms up to 1 s.
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(1))
                    .set_number_of_retries(6);
                ConnectionManager::new_lazy_with_config(client, cfg)
                    .map(Conn::Single)
                    .map_err(|e| e.to_string())
            }
            StoreSpec::RedisCluster(nodes) => {
                let nodes = nodes
                    .iter()
                    .map(|n| no_delay(n))
                    .collect::<Result<Vec<_>, _>>()?;
                let client = ClusterClient::builder(nodes)
                    .connection_timeout(connect_timeout)
                    .response_timeout(op_timeout)
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(100)
                    .build()
                    .map_err(|e| e.to_string())?;
                let cfg = ClusterConfig::new()
                    .set_connection_timeout(connect_timeout)
                    .set_response_timeout(op_timeout);
                Ok(Conn::Cluster(
                    client.get_pending_async_connection_with_config(cfg),
                ))
            }
            StoreSpec::Memory => Err("not a Redis store".into()),
        }
    }
}

/// The node's connection settings with `TCP_NODELAY` (the client's default leaves Nagle on,
/// which holds small pipelined commands back by up to a delayed-ACK timeout).
fn no_delay(url: &str) -> Result<ConnectionInfo, String> {
    let info = url.into_connection_info().map_err(|e| e.to_string())?;
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    Ok(info.set_tcp_settings(tcp))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
