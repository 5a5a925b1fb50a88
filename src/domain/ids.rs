//! Identifiers and bounded names: GSNs, coordinator ids, request ids and business types, each
//! validated once at the edge so the rest of the code can trust them.

use std::fmt;

/// Why an identifier was refused; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("is required")]
    Empty,
    #[error("is {len} characters long; at most {max} are allowed")]
    TooLong { len: usize, max: usize },
    #[error("contains {found:?}; only letters, digits and {allowed} are allowed")]
    BadCharacter { found: char, allowed: &'static str },
    #[error(
        "{text:?} is not a GSN: expected <coordinator_id>-<16 digits>, e.g. c1-0000000000000042"
    )]
    MalformedGsn { text: String },
}

fn check_name(text: &str, max: usize, allowed: &'static str) -> Result<(), Error> {
    if text.is_empty() {
        return Err(Error::Empty);
    }
    let len = text.chars().count();
    if len > max {
        return Err(Error::TooLong { len, max });
    }
    match text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || allowed.contains(*c)))
    {
        Some(found) => Err(Error::BadCharacter { found, allowed }),
        None => Ok(()),
    }
}

/// The id of one sagad instance, carried in every GSN it issues.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CoordinatorId(String);

impl CoordinatorId {
    pub const MAX_LEN: usize = 32;
    pub const ALLOWED: &'static str = "-_";

    pub fn parse(text: &str) -> Result<CoordinatorId, Error> {
        check_name(text, Self::MAX_LEN, Self::ALLOWED)?;
        Ok(CoordinatorId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CoordinatorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Global serial number of a saga: who issued it and its sequence there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gsn {
    coordinator: CoordinatorId,
    sequence: u64,
}

impl Gsn {
    /// Sixteen digits hold any sequence below 10^16 and keep GSNs of one coordinator sorted as
    /// text in issue order.
    const DIGITS: usize = 16;

    pub fn new(coordinator: CoordinatorId, sequence: u64) -> Gsn {
        Gsn {
            coordinator,
            sequence,
        }
    }

    pub fn coordinator(&self) -> &CoordinatorId {
        &self.coordinator
    }

    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    pub fn parse(text: &str) -> Result<Gsn, Error> {
        let malformed = || Error::MalformedGsn {
            text: text.to_owned(),
        };
        let (coordinator, digits) = text.rsplit_once('-').ok_or_else(malformed)?;
        if digits.len() != Self::DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        let sequence = digits.parse::<u64>().map_err(|_| malformed())?;
        let coordinator = CoordinatorId::parse(coordinator).map_err(|_| malformed())?;
        Ok(Gsn::new(coordinator, sequence))
    }
}

impl fmt::Display for Gsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{:0width$}",
            self.coordinator,
            self.sequence,
            width = Self::DIGITS
        )
    }
}

/// A participant node's id, as strategies, outcalls and endpoints name it (`inventory`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

impl NodeId {
    pub const MAX_LEN: usize = 64;
    pub const ALLOWED: &'static str = "._-";

    pub fn parse(text: &str) -> Result<NodeId, Error> {
        check_name(text, Self::MAX_LEN, Self::ALLOWED)?;
        Ok(NodeId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A caller-chosen idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(String);

impl RequestId {
    pub const MAX_LEN: usize = 128;

    /// Any printable text: callers use UUIDs, serial numbers or their own composite keys.
    pub fn parse(text: &str) -> Result<RequestId, Error> {
        if text.is_empty() {
            return Err(Error::Empty);
        }
        let len = text.chars().count();
        if len > Self::MAX_LEN {
            return Err(Error::TooLong {
                len,
                max: Self::MAX_LEN,
            });
        }
        if let Some(found) = text.chars().find(|c| c.is_control()) {
            return Err(Error::BadCharacter {
                found,
                allowed: "any printable character",
            });
        }
        Ok(RequestId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The business type of a saga, which names its strategy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BusinessType(String);

impl BusinessType {
    pub const MAX_LEN: usize = 128;
    pub const ALLOWED: &'static str = "._-:/";

    pub fn parse(text: &str) -> Result<BusinessType, Error> {
        check_name(text, Self::MAX_LEN, Self::ALLOWED)?;
        Ok(BusinessType(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where a command sagad issued stands in the order of issue: the outbox number in its id
/// (`<gsn>:<kind letter><outbox number>` and, for a send of an action, `.<send>`). Outbox
/// numbers only grow, so a later command for the same branch has a higher one; a redelivery
/// keeps its id and number. `None` for text that is not such an id.
pub fn command_sequence(command_id: &str) -> Option<u64> {
    let (_gsn, rest) = command_id.rsplit_once(':')?;
    let rest = rest.strip_prefix(['e', 'r', 'q', 's'])?;
    let number = rest.split_once('.').map_or(rest, |(number, _send)| number);
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn command_ids_are_ordered_by_their_outbox_number() {
        assert_eq!(command_sequence("c1-0000000000000007:e12.3"), Some(12));
        assert_eq!(command_sequence("c1-0000000000000007:r13"), Some(13));
        assert_eq!(
            command_sequence("a:b:s9"),
            Some(9),
            "the GSN part is not read"
        );
        for not_ours in [
            "",
            "e12",
            "c1:x12",
            "c1:e",
            "c1:e1x.2",
            "c1:e+1",
            "c1:e99999999999999999999",
        ] {
            assert_eq!(command_sequence(not_ours), None, "{not_ours:?}");
        }
    }
    #[test]
    fn gsn_text_names_the_issuing_coordinator() {
        let gsn = Gsn::new(CoordinatorId::parse("eu-west-1").unwrap(), 42);
        assert_eq!(gsn.to_string(), "eu-west-1-0000000000000042");
        let parsed = Gsn::parse("eu-west-1-0000000000000042").unwrap();
        assert_eq!(parsed.coordinator().as_str(), "eu-west-1");
        assert_eq!(parsed.sequence(), 42);
    }

    #[test]
    fn malformed_gsns_are_refused() {
        for text in [
            "",
            "c1",
            "c1-42",
            "-0000000000000042",
            "c1-00000000000000x2",
            "c 1-0000000000000042",
        ] {
            assert!(
                matches!(Gsn::parse(text), Err(Error::MalformedGsn { .. })),
                "{text}"
            );
        }
    }

    #[test]
    fn node_ids_are_short_plain_names() {
        assert!(NodeId::parse("payments.eu-1_a").is_ok());
        assert_eq!(NodeId::parse(""), Err(Error::Empty));
        assert!(matches!(
            NodeId::parse("a/b"),
            Err(Error::BadCharacter { found: '/', .. })
        ));
        assert!(matches!(
            NodeId::parse(&"n".repeat(65)),
            Err(Error::TooLong { .. })
        ));
    }

    #[test]
    fn business_type_limits_are_explained() {
        assert_eq!(BusinessType::parse(""), Err(Error::Empty));
        assert!(matches!(
            BusinessType::parse(&"x".repeat(129)),
            Err(Error::TooLong { len: 129, max: 128 })
        ));
        assert!(matches!(
            BusinessType::parse("order type"),
            Err(Error::BadCharacter { found: ' ', .. })
        ));
        assert!(BusinessType::parse("payments/charge:v2").is_ok());
    }

    proptest! {
        #[test]
        fn gsn_round_trips_through_text(coordinator in "[a-z0-9][a-z0-9_-]{0,31}", sequence in 0u64..10_000_000_000_000_000) {
            let gsn = Gsn::new(CoordinatorId::parse(&coordinator).unwrap(), sequence);
            prop_assert_eq!(Gsn::parse(&gsn.to_string()).unwrap(), gsn);
        }

        #[test]
        fn gsn_text_order_is_issue_order(a in 0u64..10_000_000_000_000_000, b in 0u64..10_000_000_000_000_000) {
            let c = CoordinatorId::parse("c1").unwrap();
            let (ga, gb) = (Gsn::new(c.clone(), a), Gsn::new(c, b));
            prop_assert_eq!(ga.to_string().cmp(&gb.to_string()), a.cmp(&b));
        }
    }
}
