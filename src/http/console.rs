//! The staff console at `/admin`: server-rendered HTML, no build toolchain.
//! Search by account id, email, request id or Stripe id; follow an audit
//! entry to its events and related entries; an account page with its
//! ledger, generations, subscription and sessions, from which staff replay
//! a Stripe event or start an impersonation. Plain forms and links: usable
//! with the keyboard.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use uuid::Uuid;

use super::{ApiError, AppState, Auth, Form, Path, Query, Staff};
use crate::audit::{AuditEntry, Filter, Shows, query};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin", get(home))
        .route("/admin/totp", post(totp))
        .route("/admin/console/accounts/{id}", get(account))
        .route(
            "/admin/console/accounts/{id}/impersonate",
            post(impersonate),
        )
        .route("/admin/console/audit/{seq}", get(entry))
        .route("/admin/console/stripe/{id}/replay", post(replay))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:1.5rem auto;padding:0 1rem;color:#1b1f24}\
a{color:#0b57d0}a:focus,button:focus,input:focus{outline:3px solid #f59e0b;outline-offset:2px}\
table{border-collapse:collapse;width:100%;margin:.5rem 0 1.5rem}th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #e3e6ea;vertical-align:top}\
th{background:#f5f7f9}code{font-size:13px}.muted{color:#5f6b7a}.bad{color:#b42318}input[type=text],input[type=search]{padding:.35rem;width:22rem}\
button{padding:.35rem .8rem}nav{margin-bottom:1rem}";

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content='width=device-width'>\
         <title>{} · Slate staff</title><style>{STYLE}</style></head><body>\
         <nav><a href='/admin' accesskey='h'>Slate staff console</a></nav><main>{body}</main></body></html>",
        esc(title)
    ))
}

fn sign_in_page() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        page(
            "Sign in",
            "<h1>Sign in</h1><p>Staff sign in with the company account, then the second factor.</p>\
             <p><a href='/v1/auth/oidc/start'>Sign in with Google</a></p>\
             <form method=post action='/admin/totp'><label>Authenticator code \
             <input name=code inputmode=numeric autocomplete=one-time-code pattern='[0-9]{6}' required></label> \
             <button>Verify</button></form>",
        ),
    )
        .into_response()
}

/// A table of entries. It shows no request origin (client address, user
/// agent): the entries are read with [`Shows::NoOrigin`], which does not
/// open it, so a staff read is recorded only against the accounts whose
/// data the table shows.
fn entries_table(rows: &[AuditEntry]) -> String {
    let mut t = String::from(
        "<table><thead><tr><th>#</th><th>time (UTC)</th><th>actor</th><th>action</th><th>outcome</th><th>targets</th></tr></thead><tbody>",
    );
    for e in rows {
        t.push_str(&format!(
            "<tr><td><a href='/admin/console/audit/{seq}'>{seq}</a></td><td>{at}</td><td>{kind} <code>{actor}</code>{imp}</td>\
             <td>{action}</td><td class='{cls}'>{outcome}{reason}</td><td><code>{targets}</code></td></tr>",
            seq = e.seq,
            at = e.at.format("%Y-%m-%d %H:%M:%S"),
            kind = esc(&e.actor_kind),
            actor = esc(e.actor_id.as_deref().unwrap_or("")),
            imp = e.impersonator.map(|i| format!(" <span class=muted>as staff {i}</span>")).unwrap_or_default(),
            action = esc(&e.action),
            cls = if e.outcome == "ok" { "" } else { "bad" },
            outcome = esc(&e.outcome),
            reason = e.reason.as_deref().map(|r| format!(" ({})", esc(r))).unwrap_or_default(),
            targets = esc(&e.targets.to_string()),
        ));
    }
    t.push_str("</tbody></table>");
    t
}

#[derive(Debug, Default, Deserialize)]
struct Search {
    q: Option<String>,
}

/// The staff caller, or the sign-in page for anyone else. A database out of
/// reach (or another failure) is that error, 503 `database_unavailable`,
/// not a sign-in page: the session may be fine.
fn staff_or_sign_in(staff: Result<Staff, ApiError>) -> Result<Result<Auth, Response>, ApiError> {
    match staff {
        Ok(Staff(staff)) => Ok(Ok(staff)),
        Err(e @ (ApiError::Unavailable { .. } | ApiError::Internal(_))) => Err(e),
        Err(_) => Ok(Err(sign_in_page())),
    }
}

async fn home(
    State(state): State<AppState>,
    staff: Result<Staff, ApiError>,
    Query(s): Query<Search>,
) -> Result<Response, ApiError> {
    let staff = match staff_or_sign_in(staff)? {
        Ok(staff) => staff,
        Err(page) => return Ok(page),
    };
    let q = s.q.unwrap_or_default().trim().to_owned();
    let mut body = format!(
        "<h1>Search</h1><form method=get action='/admin' role=search><label>Account id, email, request id or Stripe id \
         <input type=search name=q value='{}' autofocus accesskey='s'></label> <button>Search</button></form>",
        esc(&q)
    );
    if !q.is_empty() {
        let mut conn = state.pool.acquire().await?;
        slate_events::access::record_staff_read(
            &state.appends,
            staff.account_id,
            staff.account_id,
            "console:search",
            &staff.staff_metadata(),
        )
        .await?;
        // Part of an email finds accounts only when it names someone: with
        // fewer than three letters or digits (`@`, `.`, `a@`) it would list,
        // and record a read of, any twenty accounts. Then only a whole
        // email matches.
        let part = q.chars().filter(|c| c.is_alphanumeric()).count() >= 3;
        let accounts: Vec<(Uuid, Option<String>, bool)> = sqlx::query_as(
            "select account_id, email, staff from accounts
              where account_id::text = $1
                 or ($2 and strpos(lower(email), lower($1)) > 0)
                 or lower(email) = lower($1)
              order by created_at desc limit 20",
        )
        .bind(&q)
        .bind(part)
        .fetch_all(&mut *conn)
        .await?;
        body.push_str("<h2>Accounts</h2>");
        if accounts.is_empty() {
            body.push_str("<p class=muted>No account matches.</p>");
        } else {
            body.push_str("<ul>");
            for (id, email, is_staff) in &accounts {
                body.push_str(&format!(
                    "<li><a href='/admin/console/accounts/{id}'>{}</a> <code>{id}</code>{}</li>",
                    // A purged account's email is erased.
                    esc(email.as_deref().unwrap_or(slate_events::vault::ERASED)),
                    if *is_staff { " (staff)" } else { "" }
                ));
            }
            body.push_str("</ul>");
        }
        let by_request = query(
            &state.pool,
            &Filter {
                request_id: Some(q.clone()),
                ..Default::default()
            },
            50,
            false,
            Shows::NoOrigin,
        )
        .await?;
        let by_target = query(
            &state.pool,
            &Filter {
                target: Some(q.clone()),
                ..Default::default()
            },
            50,
            false,
            Shows::NoOrigin,
        )
        .await?;
        let mut rows: Vec<AuditEntry> = by_request.into_iter().chain(by_target).collect();
        rows.sort_by_key(|e| std::cmp::Reverse(e.seq));
        rows.dedup_by_key(|e| e.seq);
        // Each account shown, and each whose entries are shown, was read:
        // its own trail says so. (The query itself is not kept: an email
        // typed here would outlive its account's erasure.)
        if !accounts.is_empty() || rows.iter().any(|e| e.accounts().next().is_some()) {
            super::audit::record_reads(
                &state.appends,
                &staff,
                accounts.iter().map(|(id, _, _)| *id),
                &rows,
                "console:search",
            )
            .await?;
        }
        body.push_str("<h2>Audit entries</h2>");
        body.push_str(&if rows.is_empty() {
            "<p class=muted>No entry names it.</p>".to_owned()
        } else {
            entries_table(&rows)
        });
    }
    Ok(page("Search", &body).into_response())
}

#[derive(Debug, Deserialize)]
struct TotpForm {
    code: String,
}

async fn totp(
    State(state): State<AppState>,
    auth: Auth,
    Form(f): Form<TotpForm>,
) -> Result<Response, ApiError> {
    let Some(session) = auth.session_id else {
        return Ok(sign_in_page());
    };
    super::sessions::totp_attempt_allowed(&state, auth.account_id).await?;
    let mut tx = state.pool.begin().await?;
    let ok = slate_events::mfa::verify_session(
        &mut tx,
        auth.account_id,
        session,
        &f.code,
        &state.config.sealing_key,
        chrono::Utc::now(),
    )
    .await?;
    tx.commit().await?;
    if !ok {
        // As the API's own second factor does: a guess is on the record.
        let _ = slate_events::access::record_auth_failure(
            &state.appends,
            "totp_invalid",
            None,
            None,
            "/admin/totp",
        )
        .await;
        return Ok(sign_in_page());
    }
    Ok((
        StatusCode::SEE_OTHER,
        [(axum::http::header::LOCATION, "/admin")],
    )
        .into_response())
}

async fn account(
    State(state): State<AppState>,
    staff: Result<Staff, ApiError>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let staff = match staff_or_sign_in(staff)? {
        Ok(staff) => staff,
        Err(page) => return Ok(page),
    };
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found())?;
    let mut conn = state.pool.acquire().await?;
    let a = slate_events::accounts::get_account(&mut conn, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let audit = query(
        &state.pool,
        &Filter {
            account: Some(id),
            ..Default::default()
        },
        30,
        false,
        Shows::NoOrigin,
    )
    .await?;
    // The account, and any other whose sealed values its entries show (a
    // refused key's address, sealed for the key's owner).
    super::audit::record_reads(&state.appends, &staff, [id], &audit, "console:account").await?;
    let b = slate_events::credits::balance(&mut conn, id).await?;
    let ledger = slate_events::credits::ledger_page(&mut conn, id, None, 20).await?;
    let generations = slate_events::generations::list(
        &mut conn,
        id,
        &slate_events::generations::ListFilter::default(),
        None,
        20,
    )
    .await?;
    let subscription: Option<(String, String, Option<String>)> = sqlx::query_as(
        "select subscription_id, status, price_id from stripe_subscriptions where account_id = $1 order by state_at desc limit 1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let sessions = slate_events::sessions::list(&mut conn, id).await?;
    let stripe_events: Vec<(String, String, String)> = sqlx::query_as(
        "select se.stripe_event_id, se.event_type, se.status from stripe_events se
          where se.stripe_event_id in (select ae.targets->>'stripe_event' from audit_entries ae
                                        where ae.account_id = $1)
          order by se.created desc, se.stripe_event_id desc limit 20",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let mut body = format!(
        "<h1>{}</h1><p><code>{id}</code>{} · created {}</p>\
         <h2>Credits</h2><p>available <b>{}</b> · reserved {} · debt {}</p>",
        esc(a.email.as_deref().unwrap_or(slate_events::vault::ERASED)),
        if a.staff { " · staff" } else { "" },
        a.created_at.format("%Y-%m-%d"),
        b.available,
        b.reserved,
        b.debt
    );
    body.push_str("<h2>Ledger</h2><table><thead><tr><th>#</th><th>when</th><th>movement</th><th>available</th><th>reserved</th><th>debt</th></tr></thead><tbody>");
    for l in &ledger {
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:+}</td><td>{:+}</td><td>{:+}</td></tr>",
            l.position,
            l.at.format("%Y-%m-%d %H:%M"),
            esc(&l.event_type),
            l.available,
            l.reserved,
            l.debt
        ));
    }
    body.push_str("</tbody></table><h2>Generations</h2><table><thead><tr><th>id</th><th>kind</th><th>provider</th><th>status</th><th>cost</th></tr></thead><tbody>");
    for g in &generations {
        body.push_str(&format!(
            "<tr><td><a href='/admin?q={id}'><code>{id}</code></a></td><td>{}</td><td>{}</td><td>{}{}</td><td>{}</td></tr>",
            esc(&g.kind),
            esc(&g.provider),
            esc(&g.status),
            g.failure_code.as_deref().map(|c| format!(" ({})", esc(c))).unwrap_or_default(),
            g.cost,
            id = g.generation_id
        ));
    }
    body.push_str("</tbody></table><h2>Subscription</h2>");
    body.push_str(&match subscription {
        Some((sub, status, price)) => format!(
            "<p><code>{}</code> {} {}</p>",
            esc(&sub),
            esc(&status),
            esc(price.as_deref().unwrap_or(""))
        ),
        None => "<p class=muted>None.</p>".into(),
    });
    body.push_str(&format!("<h2>Sessions</h2><p>{} open</p>", sessions.len()));
    body.push_str("<h2>Stripe events</h2><table><thead><tr><th>event</th><th>type</th><th>status</th><th></th></tr></thead><tbody>");
    for (evt, t, status) in &stripe_events {
        body.push_str(&format!(
            "<tr><td><a href='/admin?q={e}'><code>{e}</code></a></td><td>{}</td><td>{}</td>\
             <td><form method=post action='/admin/console/stripe/{e}/replay'><button>Replay</button></form></td></tr>",
            esc(t),
            esc(status),
            e = esc(evt)
        ));
    }
    body.push_str(&format!(
        "</tbody></table><h2>Impersonate</h2><form method=post action='/admin/console/accounts/{id}/impersonate'>\
         <label>Reason <input type=text name=reason required minlength=3 maxlength=500></label> <button>Start (60 minutes)</button></form>\
         <h2>Audit</h2>{}",
        entries_table(&audit)
    ));
    Ok(page(
        a.email.as_deref().unwrap_or(slate_events::vault::ERASED),
        &body,
    )
    .into_response())
}

async fn entry(
    State(state): State<AppState>,
    staff: Result<Staff, ApiError>,
    Path(seq): Path<String>,
) -> Result<Response, ApiError> {
    let staff = match staff_or_sign_in(staff)? {
        Ok(staff) => staff,
        Err(page) => return Ok(page),
    };
    let seq: i64 = seq.parse().map_err(|_| ApiError::not_found())?;
    let e = crate::audit::entry(&state.pool, seq, Shows::NoOrigin)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let cause = crate::audit::causing_event(&state.pool, e.event_id).await?;
    let related = crate::audit::related(&state.pool, &e, Shows::NoOrigin).await?;
    super::audit::record_reads(
        &state.appends,
        &staff,
        crate::audit::accounts_read(&e, cause.as_ref()),
        &related,
        "console:audit_entry",
    )
    .await?;
    let cause = cause.map(|c| c.event);
    let mut body = format!(
        "<h1>Entry {seq}: {}</h1>{}",
        esc(&e.action),
        entries_table(std::slice::from_ref(&e))
    );
    if let Some(acc) = e.account_id {
        body.push_str(&format!(
            "<p><a href='/admin/console/accounts/{acc}'>Account {acc}</a></p>"
        ));
    }
    if let Some(cause) = cause {
        let text = |k: &str| cause[k].as_str().unwrap_or_default().to_owned();
        let (t, stream, payload, metadata) = (
            text("event_type"),
            text("stream_id"),
            &cause["payload"],
            &cause["metadata"],
        );
        body.push_str(&format!(
            "<h2>Causing event</h2><p>{} in <code>{}</code></p><pre><code>{}</code></pre><pre><code>{}</code></pre>",
            esc(&t),
            esc(&stream),
            esc(&serde_json::to_string_pretty(&payload).unwrap_or_default()),
            esc(&serde_json::to_string_pretty(&metadata).unwrap_or_default())
        ));
    }
    body.push_str("<h2>Related entries</h2>");
    body.push_str(&if related.is_empty() {
        "<p class=muted>None.</p>".to_owned()
    } else {
        entries_table(&related)
    });
    Ok(page(&format!("Entry {seq}"), &body).into_response())
}

#[derive(Debug, Deserialize)]
struct ReasonForm {
    reason: String,
}

async fn impersonate(
    State(state): State<AppState>,
    Staff(staff): Staff,
    Path(id): Path<String>,
    Form(f): Form<ReasonForm>,
) -> Result<Response, ApiError> {
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found())?;
    let mut conn = state.pool.acquire().await?;
    let i = slate_events::impersonation::start(
        &mut conn,
        staff.account_id,
        id,
        &f.reason,
        60,
        staff.staff_metadata(),
    )
    .await
    .map_err(super::admin::impersonation_refused)?;
    Ok(page(
        "Impersonation started",
        &format!(
            "<h1>Impersonation started</h1><p>Send <code>Slate-Impersonate: {}</code> with your requests until {} (UTC). \
             It cannot be extended; every request is recorded.</p><p><a href='/admin/console/accounts/{id}'>Back to the account</a></p>",
            i.impersonation_id,
            i.expires_at.format("%H:%M")
        ),
    )
    .into_response())
}

async fn replay(
    State(state): State<AppState>,
    Staff(staff): Staff,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    // Only an event the mirror holds can be replayed (its id names the
    // stream the replay is recorded in).
    let plausible = id.starts_with("evt_")
        && id.len() <= 255
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !plausible || !slate_events::stripe::is_mirrored(&state.pool, &id).await? {
        return Err(ApiError::not_found());
    }
    let options = crate::stripe::reconcile::replay_options(state.stripe.clone());
    let outcome = match slate_events::stripe::process_with(
        &state.pool,
        &state.config.stripe_catalog,
        &id,
        &options,
    )
    .await
    {
        Ok(o) => o.describe().to_owned(),
        Err(e) => format!("failed: {e}"),
    };
    let mut conn = state.pool.acquire().await?;
    let event = slate_events::NewEvent::new(
        slate_events::DomainEvent::StripeEventReplayed(
            slate_events::catalog::StripeEventReplayed {
                stripe_event_id: id.clone(),
                staff_id: staff.account_id,
                outcome: outcome.clone(),
            },
        ),
        staff.staff_metadata(),
    );
    slate_events::store::append(
        &mut conn,
        &format!("stripe-{id}"),
        slate_events::ExpectedVersion::Any,
        &[event],
    )
    .await?;
    Ok(page(
        "Replayed",
        &format!(
            "<h1>Replayed {}</h1><p>{}</p><p><a href='/admin?q={}'>Its trail</a></p>",
            esc(&id),
            esc(&outcome),
            esc(&id)
        ),
    )
    .into_response())
}
