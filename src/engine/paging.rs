//! Page tokens: opaque to callers, checked on return so a forged or stale token is refused
//! with INVALID_ARGUMENT instead of silently listing the wrong page.

/// Where the next page starts, and in which order pages run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    /// The last GSN sequence the previous page examined.
    pub after: u64,
    pub newest_first: bool,
}

const PREFIX: &str = "p1";

impl PageToken {
    pub fn encode(&self) -> String {
        let order = if self.newest_first { 'n' } else { 'o' };
        format!("{PREFIX}{order}{:016x}", self.after)
    }

    pub fn decode(text: &str) -> Option<PageToken> {
        let rest = text.strip_prefix(PREFIX)?;
        let mut chars = rest.chars();
        let newest_first = match chars.next()? {
            'n' => true,
            'o' => false,
            _ => return None,
        };
        let hex = chars.as_str();
        if hex.len() != 16 {
            return None;
        }
        let after = u64::from_str_radix(hex, 16).ok()?;
        Some(PageToken {
            after,
            newest_first,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn page_tokens_round_trip(after: u64, newest_first: bool) {
            let token = PageToken { after, newest_first };
            prop_assert_eq!(PageToken::decode(&token.encode()), Some(token));
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,40}") {
            let _ = PageToken::decode(&text);
        }
    }

    #[test]
    fn forged_tokens_are_refused() {
        for text in [
            "",
            "p1",
            "p1x0000000000000001",
            "p1n00000000000001",
            "p2n0000000000000001",
            "p1n000000000000000g",
        ] {
            assert_eq!(PageToken::decode(text), None, "{text}");
        }
    }
}
