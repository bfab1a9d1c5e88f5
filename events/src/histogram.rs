//! Bucket bounds of `/metrics`' duration histograms (job durations, the
//! Stripe processing lag), shared with the tables that keep the totals of
//! rows folded out of them (`job_durations_retired`, `stripe_lag_retired`):
//! whatever adds to those tables must use the same bounds.

/// Upper bounds in seconds; every histogram also has +Inf.
pub const DURATION_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// [`DURATION_BUCKETS`] and +Inf (every row): the bounds under which the
/// retired totals keep their rows.
pub fn duration_bounds() -> Vec<f64> {
    let mut bounds = DURATION_BUCKETS.to_vec();
    bounds.push(f64::INFINITY);
    bounds
}
