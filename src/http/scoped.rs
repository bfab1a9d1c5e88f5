//! Reads of a user's data run in a transaction scoped to that account: the
//! `slate_rls` role, under which row-level security returns only the rows
//! whose `account_id` is the per-transaction `slate.account_id`.

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

pub async fn scoped(
    pool: &PgPool,
    account_id: Uuid,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    // One round trip: the role and the account are set with the `begin`. A
    // `Uuid` formats as hex digits and dashes only, so the statement is safe
    // to build.
    pool.begin_with(sqlx::AssertSqlSafe(format!(
        "begin; set local role slate_rls; set local slate.account_id = '{account_id}'"
    )))
    .await
}
