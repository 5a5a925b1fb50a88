//! Small statistics: latency percentiles of one run, and the median, min and max of a
//! measure over repeated runs (what the report quotes).

use serde::Serialize;

/// The `q` quantile (0..=1) of sorted microsecond samples, in milliseconds (nearest rank).
pub fn percentile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    sorted_us[index] as f64 / 1000.0
}

/// A measure over K runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Spread {
    /// `None` when no run measured it.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: values[0],
            max: values[n - 1],
            runs: n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        assert_eq!(percentile_ms(&samples, 0.50), 500.0);
        assert_eq!(percentile_ms(&samples, 0.99), 990.0);
        assert_eq!(percentile_ms(&samples, 0.999), 999.0);
        assert_eq!(percentile_ms(&samples[..1], 0.999), 1.0);
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let spread = Spread::of([4.0, 1.0, 3.0, 2.0]);
        assert_eq!(
            spread.map(|s| (s.median, s.min, s.max)),
            Some((2.5, 1.0, 4.0))
        );
        assert!(Spread::of([f64::NAN]).is_none());
    }
}
