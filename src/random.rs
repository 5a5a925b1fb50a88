//! The one home of randomness: everything that needs it (retry jitter) is handed a `Random`,
//! so tests replace it with a seeded or fixed source and every run can be replayed.

use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub trait Random: Send + Sync + 'static {
    /// A number in [0, 1).
    fn unit(&self) -> f64;
}

pub type SharedRandom = Arc<dyn Random>;

/// Seeded from the operating system once, at start.
pub struct SystemRandom(Mutex<StdRng>);

impl SystemRandom {
    pub fn new() -> SystemRandom {
        SystemRandom(Mutex::new(StdRng::from_os_rng()))
    }
}

impl Default for SystemRandom {
    fn default() -> Self {
        SystemRandom::new()
    }
}

impl Random for SystemRandom {
    fn unit(&self) -> f64 {
        match self.0.lock() {
            Ok(mut rng) => rng.random::<f64>(),
            // A poisoned lock only means another thread panicked mid-draw; the generator is fine.
            Err(poisoned) => poisoned.into_inner().random::<f64>(),
        }
    }
}

/// A seeded source, for tests that must replay.
pub struct SeededRandom(Mutex<StdRng>);

impl SeededRandom {
    pub fn new(seed: u64) -> SeededRandom {
        SeededRandom(Mutex::new(StdRng::seed_from_u64(seed)))
    }
}

impl Random for SeededRandom {
    fn unit(&self) -> f64 {
        match self.0.lock() {
            Ok(mut rng) => rng.random::<f64>(),
            Err(poisoned) => poisoned.into_inner().random::<f64>(),
        }
    }
}

/// Always the same number: for tests that assert exact delays.
pub struct FixedRandom(pub f64);

impl Random for FixedRandom {
    fn unit(&self) -> f64 {
        self.0
    }
}
