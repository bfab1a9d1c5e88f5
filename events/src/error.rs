use uuid::Uuid;

/// Errors of the domain layer. Business outcomes that a caller is expected to
/// handle (insufficient credits, already captured) are not errors: they are
/// returned as values by the command functions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("stream {stream_id} is at version {actual}, expected {expected}")]
    Conflict {
        stream_id: String,
        expected: String,
        actual: i32,
    },
    #[error("unknown account {0}")]
    UnknownAccount(Uuid),
    #[error("unknown reservation or bucket")]
    UnknownReservation,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("idempotency key reused with other arguments")]
    KeyReused,
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error("the operation has no approved price")]
    OperationNotApproved,
    #[error("cannot decode event {event_type} v{schema_version}: {reason}")]
    Decode {
        event_type: String,
        schema_version: i16,
        reason: String,
    },
    #[error("database error")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        // The ledger's stored functions raise SLxxx SQLSTATEs for caller mistakes.
        if let Some(db) = err.as_database_error() {
            let message = db.message().to_owned();
            match db.code().as_deref() {
                Some("SL002") => {
                    let id = message
                        .rsplit(' ')
                        .next()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_default();
                    return Error::UnknownAccount(id);
                }
                Some("SL003") => return Error::InvalidArgument(message),
                Some("SL004") => return Error::KeyReused,
                Some("SL005") => return Error::UnknownReservation,
                Some("SL006") => return Error::OperationNotApproved,
                _ => {}
            }
        }
        Error::Database(err)
    }
}

impl Error {
    /// True when retrying the whole transaction may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Conflict { .. } => true,
            Error::Database(e) => e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "40001" || c == "40P01"),
            _ => false,
        }
    }
}
