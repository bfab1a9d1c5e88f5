//! Fixed-window rate limits in Redis, shared by every web process. When
//! Redis cannot be reached, each process falls back to a limiter of its own
//! (same limits, per process) and says so in the log — never failing open
//! silently, never failing the request for it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;

const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// After Redis failed to answer, the next attempt to reach it waits this
/// long; hits meanwhile count locally at once. (Each hit tried again, one
/// at a time under the connection's lock, 250 ms each when Redis did not
/// answer at all, a partition or a host down: every rate-limited request
/// of the process queued behind the others, about four a second.)
const REDIS_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Limited { retry_after: u64 },
}

impl Decision {
    /// `Allowed`, or the client's 429 `rate_limited` with `Retry-After` and
    /// `message`.
    pub fn allowed(self, message: &'static str) -> Result<(), crate::http::ApiError> {
        match self {
            Decision::Allowed => Ok(()),
            Decision::Limited { retry_after } => Err(crate::http::ApiError::client(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                message,
            )
            .with_retry_after(retry_after)),
        }
    }
}

pub struct RateLimiter {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// Until when Redis is not tried ([`REDIS_RETRY`]).
    retry_at: Mutex<Option<std::time::Instant>>,
    local: Mutex<HashMap<String, (u64, u32)>>,
    last_degraded_log: AtomicI64,
    script: redis::Script,
}

impl RateLimiter {
    pub fn new(client: redis::Client) -> Self {
        Self {
            client,
            conn: tokio::sync::Mutex::new(None),
            retry_at: Mutex::new(None),
            local: Mutex::new(HashMap::new()),
            last_degraded_log: AtomicI64::new(0),
            script: redis::Script::new(
                "local n = redis.call('INCR', KEYS[1]) \
                 if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end \
                 return n",
            ),
        }
    }

    /// Count one hit of `scope`/`id` against `limit` per `window` seconds.
    pub async fn hit(&self, scope: &str, id: &str, limit: u32, window: u64) -> Decision {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let slot = now / window;
        let retry_after = (slot + 1) * window - now;
        let key = format!("slate:rl:{scope}:{id}:{slot}");
        let count = match self.redis_incr(&key, window).await {
            Some(n) => n,
            None => {
                self.log_degraded();
                self.local_incr(&key, slot)
            }
        };
        if count > limit as u64 {
            Decision::Limited { retry_after }
        } else {
            Decision::Allowed
        }
    }

    async fn redis_incr(&self, key: &str, window: u64) -> Option<u64> {
        if self.backing_off() {
            return None;
        }
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            // The hit that held the lock may have just failed to connect.
            if self.backing_off() {
                return None;
            }
            let connected = tokio::time::timeout(
                REDIS_TIMEOUT,
                self.client.get_multiplexed_async_connection(),
            )
            .await;
            match connected {
                Ok(Ok(c)) => *guard = Some(c),
                _ => {
                    self.back_off();
                    return None;
                }
            }
        }
        let mut conn = guard.as_ref()?.clone();
        drop(guard);
        let result = tokio::time::timeout(
            REDIS_TIMEOUT,
            self.script
                .key(key)
                .arg(window + 1)
                .invoke_async::<u64>(&mut conn),
        )
        .await;
        match result {
            Ok(Ok(n)) => Some(n),
            _ => {
                // Reconnect, after a while.
                *self.conn.lock().await = None;
                self.back_off();
                None
            }
        }
    }

    fn backing_off(&self) -> bool {
        let retry_at = self.retry_at.lock().expect("not poisoned");
        retry_at.is_some_and(|at| std::time::Instant::now() < at)
    }

    fn back_off(&self) {
        *self.retry_at.lock().expect("not poisoned") =
            Some(std::time::Instant::now() + REDIS_RETRY);
    }

    fn local_incr(&self, key: &str, slot: u64) -> u64 {
        let mut map = self.local.lock().expect("not poisoned");
        if map.len() > 100_000 {
            map.retain(|_, (s, _)| *s == slot);
        }
        let entry = map.entry(key.to_owned()).or_insert((slot, 0));
        entry.1 += 1;
        entry.1 as u64
    }

    fn log_degraded(&self) {
        let now = chrono::Utc::now().timestamp();
        let last = self.last_degraded_log.load(Ordering::Relaxed);
        if now - last >= 60
            && self
                .last_degraded_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!("redis unreachable: rate limits enforced per process until it is back");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{Decision, RateLimiter};

    /// A Redis that takes connections and never answers (a partition, a
    /// host that hangs) is tried once by twenty hits at once, which count
    /// locally meanwhile; each of them tried it in turn, 250 ms apiece.
    #[tokio::test]
    async fn a_redis_that_does_not_answer_is_tried_once_not_once_a_hit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        let limiter = Arc::new(RateLimiter::new(
            redis::Client::open(format!("redis://{address}")).unwrap(),
        ));
        let hits = (0..20).map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.hit("test", "a", 100, 86_400).await })
        });
        for hit in futures::future::join_all(hits).await {
            assert_eq!(hit.unwrap(), Decision::Allowed);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Over its limit locally, as with Redis.
        let mut last = Decision::Allowed;
        for _ in 0..90 {
            last = limiter.hit("test", "a", 100, 86_400).await;
        }
        assert!(matches!(last, Decision::Limited { .. }), "{last:?}");
    }
}
