//! Reads of a user's data run in a transaction scoped to that account: the
//! `slate_rls` role, under which row-level security returns only the rows
//! whose `account_id` is the per-transaction `slate.account_id`.

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

pub async fn scoped(
    pool: &PgPool,
    account_id: Uuid,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("set local role slate_rls")
        .execute(&mut *tx)
        .await?;
    sqlx::query("select set_config('slate.account_id', $1, true)")
        .bind(account_id.to_string())
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}
