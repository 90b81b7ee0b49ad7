//! The subscriber identity: an IMSI, 6 to 15 decimal digits (3GPP TS 23.003:
//! MCC, MNC, MSIN; the MEC API accepts shorter test identities from 6).

use std::fmt;

/// A validated IMSI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Imsi(String);

/// Why a string is not an IMSI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImsiError {
    /// A character other than 0-9.
    #[error("an IMSI has only the digits 0-9")]
    NotDigits,
    /// Too short or too long.
    #[error("an IMSI has 6 to 15 digits, not {0}")]
    Length(usize),
}

impl Imsi {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<Imsi, ImsiError> {
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ImsiError::NotDigits);
        }
        if !(6..=15).contains(&s.len()) {
            return Err(ImsiError::Length(s.len()));
        }
        Ok(Imsi(s.to_string()))
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when this IMSI starts with `prefix` (a PLMN id such as "00101").
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.0.starts_with(prefix)
    }
}

impl fmt::Display for Imsi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Imsi {
    type Err = ImsiError;
    fn from_str(s: &str) -> Result<Imsi, ImsiError> {
        Imsi::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_imsis() {
        assert!(Imsi::parse("001010123456789").is_ok());
        assert!(Imsi::parse("001010").is_ok());
        assert_eq!(Imsi::parse("00101"), Err(ImsiError::Length(5)));
        assert_eq!(Imsi::parse("0010101234567890"), Err(ImsiError::Length(16)));
        assert_eq!(Imsi::parse("00101a123"), Err(ImsiError::NotDigits));
        assert_eq!(Imsi::parse(" 001010123"), Err(ImsiError::NotDigits));
        assert_eq!(Imsi::parse("００１０１０"), Err(ImsiError::NotDigits));
        assert_eq!(Imsi::parse(""), Err(ImsiError::Length(0)));
    }

    #[test]
    fn prefixes() {
        let i = Imsi::parse("001010123456789").unwrap();
        assert!(i.has_prefix("00101"));
        assert!(i.has_prefix(""));
        assert!(!i.has_prefix("00102"));
    }
}
