//! Scans of the `strategies` table that take more than one range: the latest version of each
//! business type, in business-type order. Reads only; the keys' layout lives in `codec`.

use super::codec;
use super::records::StrategyRecord;
use super::tables::{Table, read_error};
use super::{Scanned, Undecodable};

/// Walks the business types from a bound, one group of versions at a time: it finds the next
/// group's first key, then reads that group's last key, so it never visits the older versions.
pub(crate) struct LatestStrategies<'a> {
    tree: &'a sled::Tree,
    /// The first key not yet passed; `None` once the scan has ended or sled has failed.
    from: Option<Vec<u8>>,
}

impl<'a> LatestStrategies<'a> {
    /// Every business type strictly after `after`, or all of them.
    pub(crate) fn new(tree: &'a sled::Tree, after: Option<&str>) -> LatestStrategies<'a> {
        LatestStrategies {
            tree,
            from: Some(after.map(codec::strategies_after).unwrap_or_default()),
        }
    }
}

impl Iterator for LatestStrategies<'_> {
    type Item = Scanned<StrategyRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        let undecodable = |key: &[u8], value: &[u8], error| Undecodable {
            table: Table::Strategies,
            key: key.to_vec(),
            value: value.to_vec(),
            error,
        };
        loop {
            let from = self.from.take()?;
            let (first, first_value) = match self.tree.range(from.as_slice()..).next()? {
                Ok(entry) => entry,
                Err(e) => return Some(Err(read_error(Table::Strategies)(e))),
            };
            let prefix = match codec::strategy_group_prefix(&first) {
                Ok(prefix) => prefix,
                Err(e) => {
                    // Skip just this key: the smallest key after it is itself plus 0x00.
                    let mut after = first.to_vec();
                    after.push(0);
                    self.from = Some(after);
                    return Some(Ok(Err(undecodable(&first, &first_value, e))));
                }
            };
            let end = codec::strategy_prefix_end(prefix);
            let latest = self.tree.range(prefix..end.as_slice()).next_back();
            self.from = Some(end);
            match latest {
                Some(Ok((key, value))) => {
                    return Some(Ok(
                        codec::decode(&value).map_err(|e| undecodable(&key, &value, e))
                    ));
                }
                Some(Err(e)) => {
                    self.from = None;
                    return Some(Err(read_error(Table::Strategies)(e)));
                }
                // Strategies are never deleted, but a group gone between the two reads is
                // simply passed.
                None => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tables::{Table, Tables};

    fn strategy(business_type: &str, version: u64) -> StrategyRecord {
        StrategyRecord {
            business_type: business_type.into(),
            version,
            description: String::new(),
            steps: Vec::new(),
            first_set: Vec::new(),
            rules: Vec::new(),
            end_statuses: Vec::new(),
            abnormal_statuses: Vec::new(),
            status_mappings: Vec::new(),
            exception_scopes: Vec::new(),
            saga_timeout_ms: 0,
            created_ms: 0,
        }
    }

    /// A damaged key or value costs one error for its business type; the scan goes on to the
    /// next business type instead of stopping or skipping healthy ones.
    #[test]
    fn damaged_entries_are_reported_and_passed() {
        let dir = tempfile::tempdir().unwrap();
        let tables = Tables::open(sled::Config::new().path(dir.path()).open().unwrap()).unwrap();
        let tree = tables.tree(Table::Strategies);
        let put = |record: &StrategyRecord| {
            let key = codec::strategy_key(&record.business_type, record.version).unwrap();
            tree.insert(key, codec::encode(record).unwrap()).unwrap();
        };
        put(&strategy("a", 1));
        put(&strategy("a", 2));
        // A key with no separator sorts between "a"'s versions and "b"'s.
        tree.insert(b"a\x01", codec::encode(&strategy("?", 1)).unwrap())
            .unwrap();
        put(&strategy("b", 1));
        tree.insert(codec::strategy_key("b", 2).unwrap(), &[1, 0xff][..])
            .unwrap();
        put(&strategy("c", 4));

        let scanned: Vec<Result<(String, u64), (String, String)>> =
            LatestStrategies::new(tree, None)
                .map(|s| {
                    s.expect("the ledger reads")
                        .map(|s| (s.business_type, s.version))
                        .map_err(|e| (e.strategy_business_type(), e.error().to_string()))
                })
                .collect();
        assert_eq!(scanned.len(), 4, "{scanned:?}");
        assert_eq!(scanned[0], Ok(("a".into(), 2)));
        assert!(
            scanned[1]
                .as_ref()
                .is_err_and(|(name, e)| name == "a\u{1}" && e.contains("separator"))
        );
        assert!(
            scanned[2]
                .as_ref()
                .is_err_and(|(name, e)| name == "b" && e.contains("corrupt"))
        );
        assert_eq!(scanned[3], Ok(("c".into(), 4)));
    }
}
