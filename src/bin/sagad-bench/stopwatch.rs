//! The bench's one home of clock reads: everything it times goes through `now`.

use std::time::Instant;

/// The current instant, for measuring elapsed wall time.
#[allow(clippy::disallowed_methods)] // A benchmark measures wall time; sagad's Clock is for sagad's own logic.
pub fn now() -> Instant {
    Instant::now()
}
