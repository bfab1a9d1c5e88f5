//! Impersonation: a staff member acts as an account, with a reason, for at
//! most 60 minutes (never extended). It is recorded at its start, on every
//! request made under it, and at its end, attributed to both people.

use chrono::{DateTime, Duration, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Error;
use crate::catalog::{
    Actor, DomainEvent, ImpersonatedRequest, ImpersonationEnded, ImpersonationStarted, Metadata,
};
use crate::store::{self, ExpectedVersion, NewEvent};

pub const MAX: Duration = Duration::minutes(60);

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Impersonation {
    pub impersonation_id: Uuid,
    pub staff_id: Uuid,
    pub account_id: Uuid,
    pub reason: String,
    pub started_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// Start acting as `account_id`; `request` is the staff member's own
/// metadata, with the request's origin (its id, address, user agent and
/// key), which the start records.
pub async fn start(
    conn: &mut PgConnection,
    staff_id: Uuid,
    account_id: Uuid,
    reason: &str,
    minutes: i64,
    request: Metadata,
) -> Result<Impersonation, Error> {
    let reason = reason.trim();
    if reason.len() < 3 || reason.len() > 500 {
        return Err(Error::InvalidArgument(
            "a reason of 3 to 500 characters is required".into(),
        ));
    }
    if staff_id == account_id {
        return Err(Error::InvalidArgument(
            "staff cannot impersonate themselves".into(),
        ));
    }
    let target: Option<(bool, bool)> =
        sqlx::query_as("select deleted_at is not null, staff from accounts where account_id = $1")
            .bind(account_id)
            .fetch_optional(&mut *conn)
            .await?;
    // Acting as another staff member would reach their sessions and keys.
    if target.is_some_and(|(_, staff)| staff) {
        return Err(Error::InvalidArgument(
            "a staff account cannot be impersonated".into(),
        ));
    }
    match target.map(|(deleted, _)| deleted) {
        None => return Err(Error::UnknownAccount(account_id)),
        // A deleted account acts no more (its keys and sessions ended), and
        // not through staff either.
        Some(true) => {
            return Err(Error::InvalidArgument(
                "a deleted account cannot be impersonated".into(),
            ));
        }
        Some(false) => {}
    }
    let impersonation_id = Uuid::now_v7();
    let expires_at = Utc::now() + Duration::minutes(minutes.clamp(1, MAX.num_minutes()));
    let event = NewEvent::new(
        DomainEvent::ImpersonationStarted(ImpersonationStarted {
            impersonation_id,
            staff_id,
            account_id,
            reason: reason.to_owned(),
            expires_at,
        }),
        Metadata {
            impersonator: Some(staff_id),
            ..request
        },
    );
    let appended = store::append_and_apply(
        conn,
        &format!("impersonation-{impersonation_id}"),
        ExpectedVersion::NoStream,
        &event,
    )
    .await?;
    let started_at: DateTime<Utc> =
        sqlx::query_scalar("select recorded_at from events where global_position = $1")
            .bind(appended.positions[0])
            .fetch_one(&mut *conn)
            .await?;
    Ok(Impersonation {
        impersonation_id,
        staff_id,
        account_id,
        reason: reason.to_owned(),
        started_at,
        expires_at,
    })
}

/// The staff member's metadata, without a request's origin: what ends an
/// impersonation found expired, or of an account deleted since, as a
/// request under it is authenticated.
fn by_staff(staff_id: Uuid) -> Metadata {
    Metadata::by(Actor::Staff {
        account_id: staff_id,
    })
}

/// The live impersonation `id` of this staff member at `now` (clock
/// injected by tests). An expired one, or one of an account deleted since
/// it began, is ended on the spot.
pub async fn resolve(
    conn: &mut PgConnection,
    staff_id: Uuid,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<Impersonation>, Error> {
    #[derive(sqlx::FromRow)]
    struct Found {
        #[sqlx(flatten)]
        impersonation: Impersonation,
        account_deleted: bool,
    }
    let found: Option<Found> = sqlx::query_as(
        "select i.impersonation_id, i.staff_id, i.account_id, i.reason, i.started_at, i.expires_at,
                a.deleted_at is not null as account_deleted
           from impersonations i join accounts a using (account_id)
          where i.impersonation_id = $1 and i.staff_id = $2 and i.ended_at is null",
    )
    .bind(id)
    .bind(staff_id)
    .fetch_optional(&mut *conn)
    .await?;
    match found {
        Some(f) if f.account_deleted => {
            end(
                conn,
                &f.impersonation,
                "account_deleted",
                by_staff(staff_id),
            )
            .await?;
            Ok(None)
        }
        Some(f) if now < f.impersonation.expires_at => Ok(Some(f.impersonation)),
        Some(f) => {
            end(conn, &f.impersonation, "expired", by_staff(staff_id)).await?;
            Ok(None)
        }
        None => Ok(None),
    }
}

/// End an impersonation; `request` is the metadata of what ends it (the
/// staff member's request, with its origin).
pub async fn end(
    conn: &mut PgConnection,
    i: &Impersonation,
    reason: &str,
    request: Metadata,
) -> Result<(), Error> {
    let event = NewEvent {
        event_id: store::deterministic_event_id(&format!(
            "impersonation-ended:{}",
            i.impersonation_id
        )),
        event: DomainEvent::ImpersonationEnded(ImpersonationEnded {
            impersonation_id: i.impersonation_id,
            staff_id: i.staff_id,
            account_id: i.account_id,
            reason: reason.to_owned(),
        }),
        metadata: Metadata {
            impersonator: Some(i.staff_id),
            ..request
        },
    };
    store::append_and_apply(
        conn,
        &format!("impersonation-{}", i.impersonation_id),
        ExpectedVersion::Any,
        &event,
    )
    .await?;
    Ok(())
}

/// One request made under an impersonation.
pub async fn record_request(
    conn: &mut PgConnection,
    i: &Impersonation,
    method: &str,
    route: &str,
) -> Result<(), Error> {
    let event = NewEvent::new(
        DomainEvent::ImpersonatedRequest(ImpersonatedRequest {
            impersonation_id: i.impersonation_id,
            staff_id: i.staff_id,
            account_id: i.account_id,
            method: method.to_owned(),
            route: route.to_owned(),
        }),
        Metadata {
            impersonator: Some(i.staff_id),
            ..Metadata::by(Actor::User {
                account_id: i.account_id,
            })
        },
    );
    store::append(
        conn,
        &format!("impersonation-{}", i.impersonation_id),
        ExpectedVersion::Any,
        &[event],
    )
    .await?;
    Ok(())
}
