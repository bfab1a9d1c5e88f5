//! Part 12 of `slate bench`: what authenticating a request costs. Every
//! request made with an API key reads its key with the account's wrapped
//! data key (a join), unwraps that key and seals the client's address and
//! user agent with it, whatever the request then does.

use std::time::{Duration, Instant};

use serde::Serialize;
use slate_events::Metadata;
use sqlx::PgPool;

use crate::bench_scale::{Percentiles, percentiles};

/// Requests over HTTP from concurrent clients, each with its own account's
/// API key.
#[derive(Debug, Serialize)]
pub struct Requests {
    pub path: &'static str,
    pub requests: usize,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: usize,
}

#[derive(Debug, Serialize)]
pub struct AuthCost {
    pub clients: usize,
    /// `GET /healthz`: no authentication, no database.
    pub unauthenticated: Requests,
    /// `GET /v1/credits` with an API key: the authentication and one read
    /// of the account's balance (10 buckets, among `credit_buckets`).
    pub authenticated: Requests,
    pub credit_buckets: i64,
    /// `access::authenticate` alone, one call after another on one
    /// connection: the key's read (with the data key's join) and the
    /// unwrapping of the data key.
    pub authenticate: Percentiles,
    /// Sealing a client address and a user agent with an account's key, in
    /// this process, µs per request.
    pub seal_us: f64,
}

const USER_AGENT: &str = "slate-bench/1 (a user agent of a usual length, sealed at each request)";

/// Part 12 on `pool`'s database, through a server of this build.
pub async fn auth_cost(
    config: &crate::config::Config,
    pool: &PgPool,
    clients: usize,
    requests: usize,
    samples: usize,
    other_buckets: usize,
) -> anyhow::Result<AuthCost> {
    let mut keys = Vec::with_capacity(clients);
    crate::bench_scale::fill_credit_buckets(pool, other_buckets).await?;
    let mut conn = pool.acquire().await?;
    for _ in 0..clients {
        let account = slate_workers::bench::bench_account(&mut conn).await?;
        let key =
            slate_events::access::create_key(&mut conn, account, None, Metadata::system()).await?;
        // Ten buckets of its own to list.
        sqlx::query(
            "insert into credit_buckets (bucket_id, account_id, source, grant_key, amount,
                                         remaining, expires_at, granted_position, granted_at)
             select gen_random_uuid(), $1, 'promotion', $1::text || '-bench-' || i, 100, 100,
                    now() + make_interval(days => i), i, now()
               from generate_series(1, 10) i",
        )
        .bind(account)
        .execute(&mut *conn)
        .await?;
        keys.push((account, key.plaintext));
    }
    sqlx::query("analyze credit_buckets")
        .execute(&mut *conn)
        .await?;
    let credit_buckets: i64 = sqlx::query_scalar("select count(*) from credit_buckets")
        .fetch_one(&mut *conn)
        .await?;
    // Each request's own seals, as the extractor makes them.
    let (account, _) = &keys[0];
    let data_key = slate_events::vault::AccountKey::known_or_create(&mut conn, *account, None)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no data key for {account}"))?;
    let rounds = 100_000u32;
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(data_key.seal(std::hint::black_box("203.0.113.77")));
        std::hint::black_box(data_key.seal(std::hint::black_box(USER_AGENT)));
    }
    let seal_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
    let mut ms = Vec::with_capacity(samples);
    for i in 0..samples {
        let t = Instant::now();
        let presented =
            slate_events::access::authenticate(&mut conn, &keys[i % keys.len()].1).await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(presented.owner().is_some(), "a bench key was refused");
    }
    let authenticate = percentiles(ms);
    drop(conn);
    let keys: Vec<String> = keys.into_iter().map(|(_, k)| k).collect();
    crate::bench::serving(config.clone(), pool, |base| async move {
        // Warm both paths (connections, plans), unmeasured.
        drive(&base, "/healthz", &keys, clients * 10).await?;
        drive(&base, "/v1/credits", &keys, clients * 10).await?;
        let unauthenticated = drive(&base, "/healthz", &keys, requests).await?;
        let authenticated = drive(&base, "/v1/credits", &keys, requests).await?;
        anyhow::Ok(AuthCost {
            clients,
            unauthenticated,
            authenticated,
            credit_buckets,
            authenticate,
            seal_us,
        })
    })
    .await
}

/// `n` requests for `path` from one client per key, each with its key.
async fn drive(
    base: &str,
    path: &'static str,
    keys: &[String],
    n: usize,
) -> anyhow::Result<Requests> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(keys.len())
        .user_agent(USER_AGENT)
        .timeout(Duration::from_secs(30))
        .build()?;
    let per_client = n.div_ceil(keys.len());
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(keys.len());
    for key in keys {
        let (client, url, auth) = (
            client.clone(),
            format!("{base}{path}"),
            format!("Bearer {key}"),
        );
        tasks.push(tokio::spawn(async move {
            let (mut ms, mut errors) = (Vec::with_capacity(per_client), 0usize);
            for _ in 0..per_client {
                let t = Instant::now();
                let ok = match client.get(&url).header("authorization", &auth).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                // Only answered requests are timed: a refusal is no answer.
                if ok {
                    ms.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors += 1;
                }
            }
            (ms, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::with_capacity(n), 0);
    for t in tasks {
        let (ms, e) = t.await?;
        all.extend(ms);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(errors == 0, "{errors} requests to {path} failed");
    let requests = all.len();
    let p = percentiles(all);
    Ok(Requests {
        path,
        requests,
        per_second: requests as f64 / secs,
        p50_ms: p.p50_ms,
        p99_ms: p.p99_ms,
        errors,
    })
}

pub fn print(a: &AuthCost) {
    for r in [&a.unauthenticated, &a.authenticated] {
        println!(
            "12. {} from {} clients: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms ({} errors)",
            r.path, a.clients, r.per_second, r.p50_ms, r.p99_ms, r.errors
        );
    }
    println!(
        "12. (each balance lists its account's 10 buckets among {} in the table)",
        a.credit_buckets
    );
    println!(
        "12. an API key's authentication alone (its read with the data key, the unwrap): p50 {:.3} ms, p99 {:.3} ms; sealing the address and user agent: {:.1} µs a request",
        a.authenticate.p50_ms, a.authenticate.p99_ms, a.seal_us
    );
}
