//! Connection and migrations.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// Slate's own migrations. They are recorded in `_slate_migrations`, apart
/// from the job queue's, so each set can evolve on its own.
pub fn migrator() -> Migrator {
    let mut m = sqlx::migrate!("../migrations");
    m.dangerous_set_table_name("_slate_migrations");
    m
}

/// Connect a pool with sane timeouts; statements are never logged.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let (pool, options) = pool_for(url, max_connections)?;
    pool.connect_with(options).await
}

/// [`connect`]'s pool without connecting: the first connection is opened
/// when the pool is first used. For a server that must start (and say it
/// is not ready) while PostgreSQL is out of reach.
pub fn connect_lazy(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let (pool, options) = pool_for(url, max_connections)?;
    Ok(pool.connect_lazy_with(options))
}

fn pool_for(
    url: &str,
    max_connections: u32,
) -> Result<(PgPoolOptions, PgConnectOptions), sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let options = options
        .application_name("slate")
        .disable_statement_logging();
    let pool = pool_options()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5));
    Ok((pool, options))
}

/// [`connect`], waiting for PostgreSQL while it is out of reach
/// ([`unavailable`]: down, restarting, refusing connections): tries again
/// after 1 s, doubling to [`START_PATIENCE_STEP`], with a warning each time,
/// until it connects or `give_up` resolves (then `None`). Any other error
/// (a wrong password, a missing database, a malformed URL) is returned at
/// once: waiting would not mend it.
///
/// A process started during an outage used to exit after the pool's 5 s
/// acquire timeout; its supervisor restarted it, and a supervisor with a
/// growing restart delay (systemd's, Kubernetes' crash-loop back-off) could
/// keep it down for minutes after PostgreSQL was back.
pub async fn connect_waiting(
    url: &str,
    max_connections: u32,
    give_up: impl std::future::Future<Output = ()>,
) -> Result<Option<PgPool>, sqlx::Error> {
    tokio::pin!(give_up);
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_secs(1);
    let mut waited = false;
    loop {
        let error = tokio::select! {
            _ = &mut give_up => return Ok(None),
            connected = connect(url, max_connections) => match connected {
                Ok(pool) => {
                    if waited {
                        tracing::info!(
                            waited_s = started.elapsed().as_secs(),
                            "PostgreSQL answers; starting"
                        );
                    }
                    return Ok(Some(pool));
                }
                Err(e) if unavailable(&e) => e,
                Err(e) => return Err(e),
            },
        };
        tracing::warn!(
            error = %error,
            target = %target(url),
            waited_s = started.elapsed().as_secs(),
            retry_in_s = pause.as_secs(),
            "PostgreSQL is out of reach; waiting for it before starting"
        );
        waited = true;
        tokio::select! {
            _ = &mut give_up => return Ok(None),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(START_PATIENCE_STEP);
    }
}

/// Where `url` points, for a log line that must let an operator spot a
/// wrong host or port: `host:port/database`, or the socket's directory and
/// the database. Never the user name or the password.
pub fn target(url: &str) -> String {
    let Ok(options) = url.parse::<PgConnectOptions>() else {
        return "(an unparsable URL)".into();
    };
    let database = options.get_database().unwrap_or("");
    match options.get_socket() {
        Some(socket) => format!("{}/{database}", socket.display()),
        None => format!("{}:{}/{database}", options.get_host(), options.get_port()),
    }
}

/// The longest pause between two of [`connect_waiting`]'s attempts.
pub const START_PATIENCE_STEP: Duration = Duration::from_secs(10);

/// Pool options every Slate pool starts from: each new connection gets
/// [`disable_nagle`], and an idle connection is checked for liveness before
/// it is handed out only when it has been idle for [`PING_AFTER_IDLE`].
///
/// sqlx checks a connection when it goes back to the pool (a round trip
/// that also flushes what a dropped future left behind) and, by default,
/// again when it is taken out. Under load a connection is idle for a few
/// milliseconds between the two, and the second check was one more round
/// trip before every transaction and statement run on the pool. A
/// connection that dies in that short time (the server restarted) fails its
/// next statement instead, as an outage fails the one in flight, and is
/// closed when it goes back (the check on release fails).
pub fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new()
        .after_connect(|conn, _| Box::pin(disable_nagle(conn)))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// How long a pooled connection may sit idle before it is checked again
/// when it is taken out (see [`pool_options`]).
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// A connection of its own (outside any pool), with [`disable_nagle`].
pub async fn connect_one(options: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    let mut conn = PgConnection::connect_with(options).await?;
    disable_nagle(&mut conn).await?;
    Ok(conn)
}

/// Turn Nagle's algorithm off on a connection's TCP socket.
///
/// sqlx 0.9.0 stopped setting `TCP_NODELAY` (transact-rs/sqlx#4335; the fix,
/// #4336, is not in a release yet). With Nagle on, the tail of a message
/// longer than one segment (a batch of webhook bodies, a `COPY` chunk; a
/// segment is 64 KiB on loopback) waits for the server's delayed ACK, 40 ms
/// on Linux: `slate bench` showed webhook ingest at p50 49 ms from that alone.
/// sqlx gives no access to its socket, so this finds it among the process's
/// descriptors by the two ports PostgreSQL reports for the session. Does
/// nothing over a Unix socket or where there is no `/proc/self/fd`.
pub async fn disable_nagle(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    if with_tcp_socket(conn, |s| s.set_nodelay(true).is_ok())
        .await?
        .is_none()
    {
        tracing::debug!("no TCP socket found for the connection; TCP_NODELAY not set");
    }
    Ok(())
}

/// Whether Nagle's algorithm is off on a connection's TCP socket (`None`:
/// not over TCP, or the socket was not found). For tests.
#[doc(hidden)]
pub async fn nodelay(conn: &mut PgConnection) -> Result<Option<bool>, sqlx::Error> {
    with_tcp_socket(conn, |s| s.nodelay().unwrap_or(false)).await
}

/// Run `f` on the connection's TCP socket, found among the process's file
/// descriptors by the client and server ports PostgreSQL reports for the
/// session. `None` over a Unix socket or when it is not found.
async fn with_tcp_socket<T>(
    conn: &mut PgConnection,
    f: impl FnOnce(&std::net::TcpStream) -> T,
) -> Result<Option<T>, sqlx::Error> {
    let (client, server): (Option<i32>, Option<i32>) =
        sqlx::query_as("select inet_client_port(), inet_server_port()")
            .fetch_one(&mut *conn)
            .await?;
    Ok(match (client, server) {
        (Some(client), Some(server)) => on_socket_by_ports(client as u16, server as u16, f),
        _ => None,
    })
}

/// Run `f` on this process's TCP socket whose local port is `local` and
/// whose peer's port is `peer`, if there is one.
#[cfg(target_os = "linux")]
fn on_socket_by_ports<T>(
    local: u16,
    peer: u16,
    f: impl FnOnce(&std::net::TcpStream) -> T,
) -> Option<T> {
    use std::mem::ManuallyDrop;
    use std::os::fd::{FromRawFd, RawFd};
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        if !std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        {
            continue;
        }
        // SAFETY: the descriptor is only borrowed: ManuallyDrop never closes
        // it. The calls made on it only read a socket's addresses or read or
        // set one option; on a descriptor that is not a TCP socket (or was
        // closed and reused meanwhile) they fail or do not match, and
        // nothing else happens.
        let socket = ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
        let (Ok(l), Ok(p)) = (socket.local_addr(), socket.peer_addr()) else {
            continue;
        };
        if l.port() == local && p.port() == peer {
            return Some(f(&socket));
        }
    }
    None
}

#[cfg(not(target_os = "linux"))]
fn on_socket_by_ports<T>(_: u16, _: u16, _: impl FnOnce(&std::net::TcpStream) -> T) -> Option<T> {
    None
}

/// True when the error comes from PostgreSQL being out of reach (down,
/// restarting, refusing connections, or the pool timing out waiting for
/// one): retrying later may succeed; retrying now will not.
pub fn unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions (08…), and the server shutting down or not yet
        // accepting connections (57P01–57P03).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

/// [`unavailable`] for an error or anything in its chain of sources.
pub fn unavailable_in(e: &(dyn std::error::Error + 'static)) -> bool {
    sqlx_error_in(e, unavailable)
}

/// True when the error or anything in its chain of sources is the pool
/// giving up on a connection ([`sqlx::Error::PoolTimedOut`]): PostgreSQL was
/// out of reach for the pool's whole acquire timeout, so whoever tries next
/// right now will wait as long for the same answer.
pub fn timed_out_in(e: &(dyn std::error::Error + 'static)) -> bool {
    sqlx_error_in(e, |e| matches!(e, sqlx::Error::PoolTimedOut))
}

/// True when the error or anything in its chain of sources is the pool
/// being closed ([`sqlx::Error::PoolClosed`]): the process is stopping, so
/// waiting for the database to come back is pointless.
pub fn closed_in(e: &(dyn std::error::Error + 'static)) -> bool {
    sqlx_error_in(e, |e| matches!(e, sqlx::Error::PoolClosed))
}

fn sqlx_error_in(e: &(dyn std::error::Error + 'static), is: impl Fn(&sqlx::Error) -> bool) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<sqlx::Error>().is_some_and(&is) {
            return true;
        }
        cause = c.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::target;

    #[test]
    fn a_target_names_host_port_and_database_but_no_credentials() {
        let t = target("postgres://slate:s3cret@db.internal:6432/slate_prod?sslmode=disable");
        assert_eq!(t, "db.internal:6432/slate_prod");
        assert!(!t.contains("s3cret") && !t.contains("slate:"));
        assert_eq!(target("postgres://u@localhost/x"), "localhost:5432/x");
        assert_eq!(target("not a url"), "(an unparsable URL)");
    }
}
