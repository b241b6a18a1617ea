//! Validated names for services and nodes.
//!
//! Names travel in frames, certificates (as DNS SANs) and log lines, so they are restricted to a
//! DNS-label-like alphabet: lowercase ASCII letters, digits, `-` and (for node names) `.`.
//! Validation also runs on deserialization, so a peer cannot smuggle a bad name past us.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest name we accept (one DNS label for services, a short FQDN for nodes).
pub const MAX_NAME_LEN: usize = 63;

/// Why a name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {0} characters long; at most {MAX_NAME_LEN} are allowed")]
    TooLong(usize),
    #[error("name {0:?} must start with a lowercase letter or digit")]
    BadStart(String),
    #[error("name {0:?} may contain only lowercase letters, digits, '-'{1}")]
    BadChar(String, &'static str),
}

fn validate(s: &str, allow_dot: bool) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(s.len()));
    }
    let first = s.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(NameError::BadStart(s.to_owned()));
    }
    let ok = s.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (allow_dot && b == b'.')
    });
    if !ok {
        let extra = if allow_dot { " and '.'" } else { "" };
        return Err(NameError::BadChar(s.to_owned(), extra));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $allow_dot:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Validates and wraps `s`.
            pub fn new(s: &str) -> Result<Self, NameError> {
                validate(s, $allow_dot)?;
                Ok(Self(s.to_owned()))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                validate(&s, $allow_dot)?;
                Ok(Self(s))
            }
        }

        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }

        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

name_type!(
    /// The name of a service an outlet offers, such as `influxdb`: one DNS label.
    ServiceName,
    false
);
name_type!(
    /// The name of a node (relay, outlet or inlet), as written in its certificate's DNS SAN.
    NodeName,
    true
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_labels() {
        assert!(ServiceName::new("influxdb").is_ok());
        assert!(ServiceName::new("db-2").is_ok());
        assert!(NodeName::new("outlet.eu-1").is_ok());
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(ServiceName::new(""), Err(NameError::Empty));
        assert!(matches!(
            ServiceName::new("Influx"),
            Err(NameError::BadStart(_))
        ));
        assert!(matches!(
            ServiceName::new("a.b"),
            Err(NameError::BadChar(..))
        ));
        assert!(matches!(
            ServiceName::new("a b"),
            Err(NameError::BadChar(..))
        ));
        assert!(matches!(NodeName::new("-x"), Err(NameError::BadStart(_))));
        assert!(matches!(
            NodeName::new(&"a".repeat(64)),
            Err(NameError::TooLong(64))
        ));
    }

    #[test]
    fn deserialization_validates() {
        let bad: Result<ServiceName, _> = serde_json_like("\"BAD NAME\"");
        assert!(bad.is_err());
    }

    fn serde_json_like(s: &str) -> Result<ServiceName, NameError> {
        // A String goes through `TryFrom<String>`, exactly as serde does.
        ServiceName::try_from(s.trim_matches('"').to_owned())
    }
}
