//! Accounts: opening one appends `AccountCreated` and fills the inline
//! projections in the same transaction.

use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

use crate::Error;
use crate::catalog::{AccountCreated, DomainEvent, Metadata};
use crate::store::{self, ExpectedVersion, NewEvent};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Account {
    pub account_id: Uuid,
    pub email: String,
    pub staff: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// Open an account. The email must be new (case-insensitively).
#[tracing::instrument(skip_all, fields(account_id))]
pub async fn create_account(
    conn: &mut PgConnection,
    email: &str,
    staff: bool,
    metadata: Metadata,
) -> Result<Uuid, Error> {
    let email = email.trim();
    if email.len() < 3 || email.len() > 254 || !email.contains('@') {
        return Err(Error::InvalidArgument("email is not an address".into()));
    }
    let taken: bool =
        sqlx::query_scalar("select exists(select 1 from accounts where lower(email) = lower($1))")
            .bind(email)
            .fetch_one(&mut *conn)
            .await?;
    if taken {
        return Err(Error::EmailTaken);
    }

    let account_id = Uuid::now_v7();
    tracing::Span::current().record("account_id", tracing::field::display(account_id));
    let event = NewEvent::new(
        DomainEvent::AccountCreated(AccountCreated {
            account_id,
            email: email.to_owned(),
            staff,
        }),
        metadata,
    );
    let mut tx = conn.begin().await?;
    match store::append_and_apply(
        &mut tx,
        &store::account_stream(account_id),
        ExpectedVersion::NoStream,
        &event,
    )
    .await
    {
        Ok(_) => {}
        Err(Error::Database(e))
            if e.as_database_error()
                .is_some_and(|d| d.constraint() == Some("accounts_email_idx")) =>
        {
            return Err(Error::EmailTaken);
        }
        Err(e) => return Err(e),
    }
    tx.commit().await?;
    Ok(account_id)
}

pub async fn get_account(
    conn: &mut PgConnection,
    account_id: Uuid,
) -> Result<Option<Account>, Error> {
    Ok(sqlx::query_as(
        "select account_id, email, staff, created_at from accounts where account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(conn)
    .await?)
}
