//! The affiliate programme: an account may come through an affiliate's
//! referral code; what a referred account pays earns the affiliate a
//! commission (integer minor units, rate in basis points), which follows
//! the payment's state ([`settle`]: a refund claws back its share, a refund
//! that failed gives it back, a dispute takes it all while it stands and a
//! won one gives it back), and payouts are recorded by operators. Every
//! movement of an affiliate's money is on its stream `affiliate-<id>`, keyed
//! so that replays and duplicates change nothing.

use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Error;
use crate::catalog::{
    AccountReferred, AffiliateCreated, AffiliatePayoutRecorded, CommissionClawedBack,
    CommissionEarned, DomainEvent, Metadata,
};
use crate::store::{self, ExpectedVersion, NewEvent};

fn stream(affiliate: Uuid) -> String {
    format!("affiliate-{affiliate}")
}

pub async fn create_affiliate(
    conn: &mut PgConnection,
    name: &str,
    referral_code: &str,
    rate_bps: i32,
    metadata: Metadata,
) -> Result<Uuid, Error> {
    let code = referral_code.trim();
    if code.is_empty()
        || code.len() > 64
        || !code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::InvalidArgument(
            "a referral code is 1-64 letters, digits, - or _".into(),
        ));
    }
    if !(0..=10_000).contains(&rate_bps) {
        return Err(Error::InvalidArgument(
            "rate is 0 to 10000 basis points".into(),
        ));
    }
    let taken: bool =
        sqlx::query_scalar("select exists(select 1 from affiliates where referral_code = $1)")
            .bind(code)
            .fetch_one(&mut *conn)
            .await?;
    if taken {
        return Err(Error::KeyReused);
    }
    let affiliate_id = Uuid::now_v7();
    let event = NewEvent::new(
        DomainEvent::AffiliateCreated(AffiliateCreated {
            affiliate_id,
            name: name.to_owned(),
            referral_code: code.to_owned(),
            rate_bps,
        }),
        metadata,
    );
    store::append_and_apply(
        conn,
        &stream(affiliate_id),
        ExpectedVersion::NoStream,
        &event,
    )
    .await?;
    Ok(affiliate_id)
}

/// Attribute an account to the affiliate owning `referral_code` (the first
/// attribution stands).
pub async fn refer(
    conn: &mut PgConnection,
    account_id: Uuid,
    referral_code: &str,
    metadata: Metadata,
) -> Result<Uuid, Error> {
    let affiliate: Option<Uuid> =
        sqlx::query_scalar("select affiliate_id from affiliates where referral_code = $1")
            .bind(referral_code.trim())
            .fetch_optional(&mut *conn)
            .await?;
    let affiliate =
        affiliate.ok_or_else(|| Error::InvalidArgument("unknown referral code".into()))?;
    let live: Option<bool> =
        sqlx::query_scalar("select deleted_at is null from accounts where account_id = $1")
            .bind(account_id)
            .fetch_optional(&mut *conn)
            .await?;
    match live {
        None => return Err(Error::UnknownAccount(account_id)),
        Some(false) => {
            return Err(Error::InvalidArgument(
                "a deleted account cannot be referred".into(),
            ));
        }
        Some(true) => {}
    }
    let event_id = store::deterministic_event_id(&format!("referred:{account_id}"));
    // An account is referred once: a second referral is the first again, or
    // refused when it names another affiliate (it read as done, and the
    // first affiliate kept the account).
    let earlier: Option<String> =
        sqlx::query_scalar("select payload->>'affiliate_id' from events where event_id = $1")
            .bind(event_id)
            .fetch_optional(&mut *conn)
            .await?;
    if earlier.is_some_and(|a| a != affiliate.to_string()) {
        return Err(Error::InvalidArgument(
            "the account was referred by another affiliate".into(),
        ));
    }
    let event = NewEvent {
        event_id,
        event: DomainEvent::AccountReferred(AccountReferred {
            account_id,
            affiliate_id: affiliate,
        }),
        metadata,
    };
    store::append_and_apply(
        conn,
        &format!("referral-{account_id}"),
        ExpectedVersion::Any,
        &event,
    )
    .await?;
    Ok(affiliate)
}

async fn referrer(conn: &mut PgConnection, account_id: Uuid) -> Result<Option<(Uuid, i32)>, Error> {
    Ok(sqlx::query_as(
        "select a.affiliate_id, a.rate_bps from account_referrals r join affiliates a using (affiliate_id)
          where r.account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(conn)
    .await?)
}

async fn append(
    conn: &mut PgConnection,
    affiliate: Uuid,
    key: &str,
    event: DomainEvent,
    metadata: &Metadata,
) -> Result<(), Error> {
    let event = NewEvent {
        event_id: store::deterministic_event_id(key),
        event,
        metadata: metadata.clone(),
    };
    store::append(
        conn,
        &stream(affiliate),
        ExpectedVersion::Any,
        std::slice::from_ref(&event),
    )
    .await?;
    Ok(())
}

/// The commission on a payment of `basis` at `rate_bps` basis points.
pub fn commission(basis: i64, rate_bps: i32) -> i64 {
    // In i128: a basis taken from a Stripe object may be any i64.
    let c = i128::from(basis.max(0)) * i128::from(rate_bps.max(0)) / 10_000;
    i64::try_from(c).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod commission_tests {
    #[test]
    fn a_commission_of_an_extreme_basis_does_not_overflow() {
        assert_eq!(super::commission(10_000, 2_000), 2_000);
        assert_eq!(super::commission(-5, 2_000), 0);
        assert_eq!(super::commission(i64::MAX, 2_000), i64::MAX / 5);
    }
}

/// A referred account paid `basis` for `stripe_object`: the affiliate earns
/// its commission, once per object.
pub async fn earn(
    conn: &mut PgConnection,
    metadata: &Metadata,
    account_id: Uuid,
    stripe_object: &str,
    currency: &str,
    basis: i64,
) -> Result<i64, Error> {
    let Some((affiliate, rate)) = referrer(conn, account_id).await? else {
        return Ok(0);
    };
    let amount = commission(basis, rate);
    if amount == 0 {
        return Ok(0);
    }
    append(
        conn,
        affiliate,
        &format!("commission:{stripe_object}"),
        DomainEvent::CommissionEarned(CommissionEarned {
            affiliate_id: affiliate,
            account_id,
            stripe_object: stripe_object.to_owned(),
            currency: currency.to_owned(),
            basis,
            amount,
        }),
        metadata,
    )
    .await?;
    Ok(amount)
}

/// The commission on a payment as its events have it: what was earned on
/// it first, what stands now (all earned on it, less all clawed back), and
/// how many times it was adjusted since.
struct Standing {
    first: CommissionEarned,
    now: i64,
    adjustments: usize,
}

async fn commission_of(
    conn: &mut PgConnection,
    stripe_object: &str,
) -> Result<Option<Standing>, Error> {
    // Through `events_commission_object_idx` (the same predicate).
    let rows: Vec<(String, i16, Value)> = sqlx::query_as(
        "select event_type, schema_version, payload from events
          where event_type in ('CommissionEarned', 'CommissionClawedBack')
            and payload->>'stripe_object' = $1
          order by global_position",
    )
    .bind(stripe_object)
    .fetch_all(&mut *conn)
    .await?;
    let mut first: Option<CommissionEarned> = None;
    let (mut now, mut adjustments) = (0i64, 0usize);
    for (t, version, payload) in rows {
        match DomainEvent::decode(&t, version, payload)? {
            DomainEvent::CommissionEarned(e) => {
                now += e.amount;
                if first.is_none() {
                    first = Some(e);
                } else {
                    adjustments += 1;
                }
            }
            DomainEvent::CommissionClawedBack(c) => {
                now -= c.amount;
                adjustments += 1;
            }
            _ => {}
        }
    }
    Ok(first.map(|first| Standing {
        first,
        now,
        adjustments,
    }))
}

/// Bring the commission on the payment `stripe_object` to what is due of
/// what was earned on it: `due` says how much (clamped to 0 ..= earned) and
/// why, from that amount and the payment's state (the refunded share, a
/// dispute that stands), and is asked only where there is a commission.
/// Claws back, or gives back, the difference: refunds, failed refunds and
/// disputes in any order, and replays, end the same. Each step is keyed by
/// the steps before it: a replay in the same state appends nothing, and the
/// same figure coming round again is a step of its own. Returns the change
/// (negative: clawed back).
pub async fn settle(
    conn: &mut PgConnection,
    metadata: &Metadata,
    stripe_object: &str,
    due: impl AsyncFnOnce(&mut PgConnection, i64) -> Result<(i64, &'static str), Error>,
) -> Result<i64, Error> {
    let Some(Standing {
        first,
        now,
        adjustments,
    }) = commission_of(conn, stripe_object).await?
    else {
        return Ok(0);
    };
    let (due, reason) = due(&mut *conn, first.amount).await?;
    let due = due.clamp(0, first.amount);
    let key = format!("commission-step:{stripe_object}:{adjustments}");
    if due < now {
        append(
            conn,
            first.affiliate_id,
            &key,
            DomainEvent::CommissionClawedBack(CommissionClawedBack {
                affiliate_id: first.affiliate_id,
                account_id: first.account_id,
                stripe_object: stripe_object.to_owned(),
                currency: first.currency.clone(),
                amount: now - due,
                reason: reason.to_owned(),
            }),
            metadata,
        )
        .await?;
    } else if due > now {
        append(
            conn,
            first.affiliate_id,
            &key,
            DomainEvent::CommissionEarned(CommissionEarned {
                affiliate_id: first.affiliate_id,
                account_id: first.account_id,
                stripe_object: stripe_object.to_owned(),
                currency: first.currency.clone(),
                basis: 0,
                amount: due - now,
            }),
            metadata,
        )
        .await?;
    }
    Ok(due - now)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owed {
    pub affiliate_id: Uuid,
    pub name: String,
    pub referral_code: String,
    pub currency: String,
    pub earned: i64,
    pub clawed_back: i64,
    pub paid: i64,
    pub owed: i64,
}

/// What is owed per affiliate and currency, exact (from the log).
pub async fn owed(conn: &mut PgConnection) -> Result<Vec<Owed>, Error> {
    let rows: Vec<(Uuid, String, String, String, i64, i64, i64)> = sqlx::query_as(
        "select a.affiliate_id, a.name, a.referral_code, e.payload->>'currency',
                coalesce(sum((e.payload->>'amount')::bigint) filter (where e.event_type = 'CommissionEarned'), 0)::bigint,
                coalesce(sum((e.payload->>'amount')::bigint) filter (where e.event_type = 'CommissionClawedBack'), 0)::bigint,
                coalesce(sum((e.payload->>'amount')::bigint) filter (where e.event_type = 'AffiliatePayoutRecorded'), 0)::bigint
           from affiliates a
           join events e on e.stream_id = 'affiliate-' || a.affiliate_id
          where e.event_type in ('CommissionEarned', 'CommissionClawedBack', 'AffiliatePayoutRecorded')
          group by 1, 2, 3, 4
          order by 2, 4",
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(affiliate_id, name, referral_code, currency, earned, clawed_back, paid)| Owed {
                affiliate_id,
                name,
                referral_code,
                currency,
                earned,
                clawed_back,
                paid,
                owed: earned - clawed_back - paid,
            },
        )
        .collect())
}

/// What recording a payout did: `recorded` false when its reference was
/// recorded already (with the same amount and currency); `owed`, what is
/// still owed in its currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payout {
    pub recorded: bool,
    pub owed: i64,
}

/// Record a payout made outside Slate. The same `reference` twice records
/// it once, and with another amount or currency is refused
/// ([`Error::KeyReused`]); more than is owed is refused.
pub async fn record_payout(
    conn: &mut PgConnection,
    affiliate_id: Uuid,
    currency: &str,
    amount: i64,
    reference: &str,
    metadata: Metadata,
) -> Result<Payout, Error> {
    if amount <= 0 || reference.trim().is_empty() {
        return Err(Error::InvalidArgument(
            "a payout needs a positive amount and a reference".into(),
        ));
    }
    // Serialize payouts of one affiliate.
    sqlx::query("select pg_advisory_xact_lock(hashtext('affiliate-payout:' || $1::text))")
        .bind(affiliate_id)
        .execute(&mut *conn)
        .await?;
    let key = format!("payout:{affiliate_id}:{reference}");
    let earlier: Option<Value> =
        sqlx::query_scalar("select payload from events where event_id = $1")
            .bind(store::deterministic_event_id(&key))
            .fetch_optional(&mut *conn)
            .await?;
    let owed_now = owed(conn)
        .await?
        .into_iter()
        .find(|o| o.affiliate_id == affiliate_id && o.currency == currency)
        .map(|o| o.owed)
        .unwrap_or(0);
    if let Some(earlier) = earlier {
        // The same payout again, or another one under a reference used.
        let same = earlier["amount"].as_i64() == Some(amount)
            && earlier["currency"].as_str() == Some(currency);
        return match same {
            true => Ok(Payout {
                recorded: false,
                owed: owed_now,
            }),
            false => Err(Error::KeyReused),
        };
    }
    if amount > owed_now {
        return Err(Error::InvalidArgument(format!(
            "only {owed_now} {currency} is owed"
        )));
    }
    append(
        conn,
        affiliate_id,
        &key,
        DomainEvent::AffiliatePayoutRecorded(AffiliatePayoutRecorded {
            affiliate_id,
            currency: currency.to_owned(),
            amount,
            reference: reference.to_owned(),
        }),
        &metadata,
    )
    .await?;
    Ok(Payout {
        recorded: true,
        owed: owed_now - amount,
    })
}
