//! The barrier over the idempotency table: Idempotency.Guard as one ledger write.
