//! The audit log as staff read it: one query behind the HTTP routes and
//! `slate audit query|export`.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// The CSV header of exports.
pub const CSV_HEADER: &str = "seq,at,actor_kind,actor_id,impersonator,action,account_id,targets,outcome,request_id,reason,event_id\n";

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub seq: i64,
    pub position: i64,
    pub event_id: Uuid,
    pub at: DateTime<Utc>,
    pub actor_kind: String,
    pub actor_id: Option<String>,
    pub impersonator: Option<Uuid>,
    pub action: String,
    pub account_id: Option<Uuid>,
    pub targets: Value,
    pub outcome: String,
    pub request_id: Option<String>,
    pub reason: Option<String>,
    pub api_key_id: Option<Uuid>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// The accounts whose sealed values were opened in it (the key's owner,
    /// for a refused key's address): a staff read is recorded against them.
    #[sqlx(skip)]
    #[serde(skip)]
    pub opened_for: Vec<Uuid>,
}

impl AuditEntry {
    /// The accounts whose data the entry shows: its own, and those whose
    /// sealed values were opened in it.
    pub fn accounts(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.account_id
            .into_iter()
            .chain(self.opened_for.iter().copied())
    }
}

/// What a reader shows of the entries it reads, so what is opened of them.
/// The request's origin (`ip`, `user_agent`) is sealed with the data key of
/// the account whose credential made the request (a staff member's, for a
/// request made under an impersonation), and opening it is reading that
/// account's data: a staff read is recorded against it. A reader that does
/// not show the origin does not open it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shows {
    /// Every field: the API's JSON, the JSON Lines export.
    Everything,
    /// All but the origin, which is left out (`None`): the staff console's
    /// tables, the CSV export, `slate audit query`.
    NoOrigin,
}

pub const COLUMNS: &str = "seq, position, event_id, at, actor_kind, actor_id, impersonator, action, account_id, \
                       targets, outcome, request_id, reason, api_key_id, ip, user_agent";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub account: Option<Uuid>,
    pub actor: Option<String>,
    /// An action (`generation.failed`) or a family (`generation`).
    pub action: Option<String>,
    /// Any target id: a generation, a Stripe event or object, a key…
    pub target: Option<String>,
    #[serde(default, deserialize_with = "bounded_time")]
    pub from: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "bounded_time")]
    pub to: Option<DateTime<Utc>>,
    pub request_id: Option<String>,
    pub outcome: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<i64>,
    pub limit: Option<i64>,
}

/// A time of years 1 to 9999, or none. chrono reads years far beyond what
/// PostgreSQL holds, which then refused the query (a 500, or an export cut
/// short); as a filter's bound it is the client's mistake (`invalid_query`).
pub fn bounded_time<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    use chrono::Datelike;
    match Option::<DateTime<Utc>>::deserialize(d)? {
        Some(t) if !(1..=9999).contains(&t.year()) => Err(serde::de::Error::custom(
            "a time between the years 1 and 9999",
        )),
        t => Ok(t),
    }
}

/// Whether a page of a time window (`from` and `to`, no more selective
/// filter) is read through the window (`audit_entries_at_idx`), then
/// sorted, rather than by walking `seq` down from the newest entry until it
/// reaches the window. The planner takes the walk, supposing the window's
/// entries spread over all seqs; they lie together, in the order they were
/// written, so a window a year back walked past every entry since: 1.9 s
/// at 10 M entries, against 20-30 ms for a day read through its index.
/// The walk stays for a window with fewer than 10,000 entries after it
/// (the newest, or one with no start); the probe reads at most that many
/// index entries.
async fn window_first(pool: &PgPool, f: &Filter) -> Result<bool, sqlx::Error> {
    let (Some(_), Some(to)) = (f.from, f.to) else {
        return Ok(false);
    };
    if f.account.is_some() || f.actor.is_some() || f.target.is_some() || f.request_id.is_some() {
        return Ok(false);
    }
    let after: i64 = sqlx::query_scalar(
        "select count(*) from (select 1 from audit_entries where at >= $1 limit 10000) a",
    )
    .bind(to)
    .fetch_one(pool)
    .await?;
    Ok(after >= 10_000)
}

/// Newest first (or oldest first), after the cursor (a seq), matching every
/// given filter. Only the given filters are in the SQL, so the planner can use
/// the index that fits (a catch-all `$1 is null or …` statement gets a
/// generic plan that cannot).
///
/// An actor that is an account id also matches what that account did as
/// someone else (an impersonating staff member's entries name the account
/// acted for as their actor, and the staff member as `impersonator`): two
/// branches, each through its own index, merged in seq order.
pub async fn query(
    pool: &PgPool,
    f: &Filter,
    limit: i64,
    ascending: bool,
    shows: Shows,
) -> Result<Vec<AuditEntry>, slate_events::Error> {
    let mut n = 0;
    let mut param = || {
        n += 1;
        format!("${n}")
    };
    let mut conditions = vec!["true".to_owned()];
    if f.account.is_some() {
        conditions.push(format!("account_id = {}", param()));
    }
    // An account id as the log writes them (hyphenated): the uuid crate
    // also reads forms PostgreSQL's uuid does not (`urn:uuid:…`).
    let actor = f
        .actor
        .as_ref()
        .map(|a| (param(), a.len() == 36 && a.parse::<Uuid>().is_ok()));
    // The actions the filter names, among those the log holds; none held,
    // no entry can match.
    let actions = match &f.action {
        None => None,
        Some(name) => {
            let actions = actions_named(pool, name).await?;
            if actions.is_empty() {
                return Ok(Vec::new());
            }
            Some((param(), actions))
        }
    };
    if f.target.is_some() {
        // Through `audit_entries_target_values_idx` (the same expression).
        conditions.push(format!(
            "jsonb_path_query_array(targets, '$.*') ? {}",
            param()
        ));
    }
    if f.from.is_some() {
        conditions.push(format!("at >= {}", param()));
    }
    if f.to.is_some() {
        conditions.push(format!("at < {}", param()));
    }
    if f.request_id.is_some() {
        conditions.push(format!("request_id = {}", param()));
    }
    if f.outcome.is_some() {
        conditions.push(format!("outcome = {}", param()));
    }
    // Through the window's time index: neither the order nor the cursor
    // may use `seq`'s. (With `seq < cursor` open to its index, the full
    // bench's deep pages read p50 74 ms against 12 with part 8 alone, most
    // likely a bitmap of the millions of entries below the cursor ANDed
    // with the window's.)
    let seq = if window_first(pool, f).await? {
        "seq + 0"
    } else {
        "seq"
    };
    if f.cursor.is_some() {
        let p = param();
        conditions.push(format!("{seq} {} {p}", if ascending { ">" } else { "<" }));
    }
    let dir = if ascending { "asc" } else { "desc" };
    let limit_param = param();
    let order = format!("order by {seq} {dir} limit {limit_param}");
    // An action's entries are read through `audit_entries_action_idx`,
    // in `seq` order, a page of each at most, when nothing narrower is
    // given: as a filter beside `seq`'s walk, an action written once in a
    // million entries walked every entry after it (seconds at 10 M). Not
    // for a window read through its time index (one read of the window,
    // not one per action).
    //
    // Each action's page is ordered by `(action, seq)`, which only that
    // index gives without a sort, and names its action as `= any(array[…])`:
    // as `action = named.name`, PostgreSQL drops the action from the order
    // (equal throughout) and, not knowing which action it is, walks the
    // primary key instead, filtering (0.97 s for an action in 100,000 at
    // 10 M entries, against 0.66 ms through the index).
    let by_action = match &actions {
        Some((p, _))
            if seq == "seq"
                && actor.is_none()
                && f.account.is_none()
                && f.target.is_none()
                && f.request_id.is_none() =>
        {
            Some(p.clone())
        }
        Some((p, _)) => {
            conditions.push(format!("action = any({p})"));
            None
        }
        None => None,
    };
    let rest = conditions.join(" and ");
    let sql = match (actor, by_action) {
        (None, Some(p)) => format!(
            "select {COLUMNS} from unnest({p}::text[]) as named(name)
               cross join lateral (select {COLUMNS} from audit_entries
                                    where action = any(array[named.name]) and {rest}
                                    order by action {dir}, seq {dir} limit {limit_param}) e
              {order}"
        ),
        (None, None) => format!("select {COLUMNS} from audit_entries where {rest} {order}"),
        (Some((a, false)), _) => {
            format!("select {COLUMNS} from audit_entries where actor_id = {a} and {rest} {order}")
        }
        (Some((a, true)), _) => format!(
            "select {COLUMNS} from (
                (select {COLUMNS} from audit_entries where actor_id = {a} and {rest} {order})
                union all
                (select {COLUMNS} from audit_entries where impersonator = {a}::uuid and {rest} {order})
             ) u {order}"
        ),
    };
    let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql));
    if let Some(v) = f.account {
        q = q.bind(v);
    }
    if let Some(v) = &f.actor {
        q = q.bind(v.clone());
    }
    if let Some((_, v)) = actions {
        q = q.bind(v);
    }
    if let Some(v) = &f.target {
        q = q.bind(v.clone());
    }
    for v in [f.from, f.to].into_iter().flatten() {
        q = q.bind(v);
    }
    for v in [&f.request_id, &f.outcome].into_iter().flatten() {
        q = q.bind(v.clone());
    }
    if let Some(v) = f.cursor {
        q = q.bind(v);
    }
    let mut entries = q.bind(limit).fetch_all(pool).await?;
    open_origins(pool, &mut entries, shows).await?;
    Ok(entries)
}

/// The actions `name` stands for: itself, and the actions of the family it
/// names (`generation` for `generation.failed`; `%` and `_` are no
/// patterns), among those the log holds. A loose scan of
/// `audit_entries_action_idx`, one probe per distinct action (a few
/// dozen), whatever the log's size.
async fn actions_named(pool: &PgPool, name: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "with recursive held(action) as (
             (select action from audit_entries order by action limit 1)
             union all
             select (select e.action from audit_entries e
                      where e.action > held.action order by e.action limit 1)
               from held where held.action is not null)
         select action from held
          where action = $1 or left(action, length($1) + 1) = $1 || '.'",
    )
    .bind(name)
    .fetch_all(pool)
    .await
}

/// Open the client addresses and user agents of `entries` for staff (each
/// sealed with the data key of the account whose credential made the
/// request, or whose key was refused), or show them erased once that
/// account is purged; with [`Shows::NoOrigin`], leave the origin out and
/// open only a refused key's address among the targets. One round trip for
/// the keys of a page; none when nothing is sealed.
async fn open_origins(
    pool: &PgPool,
    entries: &mut [AuditEntry],
    shows: Shows,
) -> Result<(), slate_events::Error> {
    use slate_events::vault::{Keyring, is_sealed};
    // A refused key's address is among the targets.
    fn sealed(e: &AuditEntry) -> impl Iterator<Item = &str> {
        [
            e.ip.as_deref(),
            e.user_agent.as_deref(),
            e.targets.get("ip").and_then(Value::as_str),
        ]
        .into_iter()
        .flatten()
        .filter(|v| is_sealed(v))
    }
    if shows == Shows::NoOrigin {
        for e in entries.iter_mut() {
            (e.ip, e.user_agent) = (None, None);
        }
    }
    if entries.iter().all(|e| sealed(e).next().is_none()) {
        return Ok(());
    }
    let mut conn = pool.acquire().await?;
    let mut keys = Keyring::default();
    keys.fetch_for(&mut conn, entries.iter().flat_map(sealed))
        .await?;
    for e in entries {
        for v in [&mut e.ip, &mut e.user_agent].into_iter().flatten() {
            if is_sealed(v) {
                *v = keys.open(&mut conn, v).await?.or_erased();
            }
        }
        keys.reveal(&mut conn, &mut e.targets).await?;
        e.opened_for = keys.take_opened().into_iter().collect();
    }
    Ok(())
}

/// A CSV cell. A value a spreadsheet would read as a formula (it starts
/// with `=`, `+`, `-`, `@`, a tab or a carriage return) is prefixed with
/// `'`, as OWASP advises: reasons, replay outcomes and operator names are
/// free text, and a formula planted in one would run when the export is
/// opened. Quoting alone does not stop that.
fn csv_field(v: &str) -> String {
    let v = if v.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{v}"))
    } else {
        std::borrow::Cow::Borrowed(v)
    };
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.into_owned()
    }
}

pub fn csv_line(e: &AuditEntry) -> String {
    let fields = [
        e.seq.to_string(),
        e.at.to_rfc3339(),
        e.actor_kind.clone(),
        e.actor_id.clone().unwrap_or_default(),
        e.impersonator.map(|i| i.to_string()).unwrap_or_default(),
        e.action.clone(),
        e.account_id.map(|a| a.to_string()).unwrap_or_default(),
        e.targets.to_string(),
        e.outcome.clone(),
        e.request_id.clone().unwrap_or_default(),
        e.reason.clone().unwrap_or_default(),
        e.event_id.to_string(),
    ];
    let mut line = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

/// One entry by its seq.
pub async fn entry(
    pool: &PgPool,
    seq: i64,
    shows: Shows,
) -> Result<Option<AuditEntry>, slate_events::Error> {
    let mut entry: Option<AuditEntry> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from audit_entries where seq = $1"
    )))
    .bind(seq)
    .fetch_optional(pool)
    .await?;
    open_origins(pool, entry.as_mut_slice(), shows).await?;
    Ok(entry)
}

/// The event an entry was made from, with its personal fields (and its
/// request's origin) opened for staff, or shown as erased once the account
/// is purged.
pub struct Cause {
    pub event: Value,
    /// The accounts whose sealed values were opened in it.
    pub opened_for: BTreeSet<Uuid>,
}

/// The [`Cause`] of the entry made from `event_id`.
pub async fn causing_event(
    pool: &PgPool,
    event_id: Uuid,
) -> Result<Option<Cause>, slate_events::Error> {
    let mut conn = pool.acquire().await?;
    let event: Option<Value> = sqlx::query_scalar(
        "select jsonb_build_object('event_id', event_id, 'stream_id', stream_id,
                'stream_version', stream_version, 'event_type', event_type,
                'schema_version', schema_version, 'payload', payload, 'metadata', metadata,
                'recorded_at', recorded_at)
           from events where event_id = $1",
    )
    .bind(event_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(mut event) = event else {
        return Ok(None);
    };
    let mut keys = slate_events::vault::Keyring::default();
    for part in ["payload", "metadata"] {
        keys.reveal(&mut conn, &mut event[part]).await?;
    }
    Ok(Some(Cause {
        event,
        opened_for: keys.take_opened(),
    }))
}

/// The accounts one entry's page reads (see `http::audit::record_reads`):
/// the entry's account, and those whose sealed values were opened in the
/// entry or its cause, whether or not the entry is a staff read itself.
pub fn accounts_read(entry: &AuditEntry, cause: Option<&Cause>) -> BTreeSet<Uuid> {
    entry
        .accounts()
        .chain(cause.into_iter().flat_map(|c| c.opened_for.iter().copied()))
        .collect()
}

/// The entries related to one: the same request, generation, Stripe event
/// or object, subscription or impersonation. A request id is the client's to
/// choose (`x-request-id`), so two clients can send the same one: entries of
/// one request share its actor and impersonator, and only those relate.
pub async fn related(
    pool: &PgPool,
    e: &AuditEntry,
    shows: Shows,
) -> Result<Vec<AuditEntry>, slate_events::Error> {
    let keys: Vec<String> = [
        "generation",
        "stripe_event",
        "stripe_object",
        "stripe_subscription",
        "impersonation",
    ]
    .iter()
    .filter_map(|k| e.targets.get(*k).and_then(Value::as_str).map(str::to_owned))
    .collect();
    let mut entries: Vec<AuditEntry> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from audit_entries
          where seq <> $1
            and (($2::text is not null and request_id = $2
                  and actor_kind = $4 and actor_id is not distinct from $5
                  and impersonator is not distinct from $6)
                 or jsonb_path_query_array(targets, '$.*') ?| $3)
          order by seq limit 100"
    )))
    .bind(e.seq)
    .bind(&e.request_id)
    .bind(&keys)
    .bind(&e.actor_kind)
    .bind(&e.actor_id)
    .bind(e.impersonator)
    .fetch_all(pool)
    .await?;
    open_origins(pool, &mut entries, shows).await?;
    Ok(entries)
}

#[cfg(test)]
mod csv_tests {
    use super::csv_field;

    #[test]
    fn formulas_are_neutralised_and_specials_quoted() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("+1"), "'+1");
        assert_eq!(csv_field("-2"), "'-2");
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_field("\tx"), "'\tx");
        assert_eq!(csv_field("\r=1"), "\"'\r=1\"");
        assert_eq!(
            csv_field("2026-12-06T00:00:00+00:00"),
            "2026-12-06T00:00:00+00:00"
        );
    }
}
