//! Cluster-wide limits (`[cluster]`): several gateways sharing one real `redis-server` on
//! loopback (started by the test, see `support::RedisServer`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use support::*;

/// The test store itself: answers, goes away, comes back empty on the same port.
#[test]
fn redis_helper_starts_stops_and_restarts_on_its_port() {
    let mut redis = RedisServer::start();
    assert!(redis.addr.ip().is_loopback());
    assert!(redis.ping());
    assert!(redis.command(&["SET", "k", "v"]).starts_with("+OK"));
    let port = redis.addr.port();
    redis.stop();
    assert!(!redis.ping());
    redis.restart();
    assert_eq!(redis.addr.port(), port);
    assert!(redis.ping());
    assert_eq!(redis.command(&["DBSIZE"]), ":0\r\n", "restarted empty");

    let secured = RedisServer::with_user("gateway", "s3cret");
    assert!(secured.ping());
    assert!(secured.command(&["DBSIZE"]).starts_with(':'));
}
