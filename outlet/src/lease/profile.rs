//! Lease profiles: which permissions and lifetime a client's lease gets, chosen by the
//! client's attributes.
//!
//! ```toml
//! [[influxdb-outlet.profile]]
//! name = "sensors"
//! when = 'role = "sensor"'
//! leased-token-permissions = '[{"action":"write","resource":{"type":"databases","name":"telemetry"}}]'
//! leased-token-expires-in = 900
//!
//! [[influxdb-outlet.profile]]
//! name = "analysts"
//! when = 'role = "analyst"'
//! leased-token-permissions = '[{"action":"read","resource":{"type":"databases","name":"telemetry"}}]'
//! leased-token-expires-in = 604800
//! hand-out = true
//! ```
//!
//! `when` is the attribute expression language of `allow` ([`postern_proto::policy`]), evaluated
//! over the attributes in the client's certificate plus its `name`. The profiles are tried in
//! the order written and the first whose `when` holds is the client's; a client that matches
//! none gets no lease at all (its requests are refused with 403 and the outlet logs which
//! identity matched nothing). Without profile tables the section's own
//! `leased-token-permissions`, `leased-token-expires-in` and `hand-out` are one implicit profile,
//! [`DEFAULT_PROFILE`], that every client matches, as before profiles existed.
//!
//! Each lease's record names its profile, so `lease list` shows it and a lease's renewals keep
//! the client's profile.

use super::config::Permission;
use postern_proto::policy::{Attributes, Expr};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// The name of the implicit profile of a section without profile tables.
pub const DEFAULT_PROFILE: &str = "default";

/// One `[[influxdb-outlet.profile]]` table as written (checked by the section's `validate`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ProfileConfig {
    /// Shown by `lease list/show`, kept in each lease's record and in the audit log.
    pub name: String,
    /// Attribute expression a client must satisfy for this profile.
    pub when: String,
    /// JSON list of permission objects, as the section's `leased-token-permissions`.
    pub leased_token_permissions: String,
    /// Lifetime of this profile's leases, in seconds (default: the section's).
    #[serde(default)]
    pub leased_token_expires_in: Option<u64>,
    /// Whether a client of this profile may ask for its own credential
    /// (`postern-inlet lease create`).
    #[serde(default)]
    pub hand_out: bool,
}

/// A validated profile.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    /// Who gets this profile.
    pub when: Expr,
    /// Lifetime of each lease.
    pub ttl: Duration,
    /// What each lease may do, `INFLUX_ORG_ID` substituted and scoped for the API.
    pub permissions: Vec<Permission>,
    /// Whether a client may have its credential handed out to it.
    pub hand_out: bool,
}

impl Profile {
    /// The implicit profile of a section without profile tables: every client matches it.
    pub fn implicit(ttl: Duration, permissions: Vec<Permission>, hand_out: bool) -> Self {
        Profile {
            name: DEFAULT_PROFILE.to_owned(),
            when: Expr::Const(true),
            ttl,
            permissions,
            hand_out,
        }
    }
}

impl Profile {
    /// Whether a lease made with `self` is also what `other` would make: same name,
    /// permissions and lifetime. Only then does a reload leave the lease alone (a changed
    /// `when` or `hand-out` does not change the credential).
    pub fn same_terms(&self, other: &Profile) -> bool {
        self.name == other.name && self.permissions == other.permissions && self.ttl == other.ttl
    }
}

/// The first profile whose `when` holds for `attrs` (the client's name included as `name`).
pub fn select<'a>(profiles: &'a [Arc<Profile>], attrs: &Attributes) -> Option<&'a Arc<Profile>> {
    profiles.iter().find(|p| p.when.eval(attrs))
}

/// Whether a profile name is usable: short, and printable without quoting in listings and logs.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(name: &str, when: &str) -> Arc<Profile> {
        Arc::new(Profile {
            name: name.into(),
            when: Expr::parse(when).expect("expression"),
            ttl: Duration::from_secs(60),
            permissions: Vec::new(),
            hand_out: false,
        })
    }

    fn attrs(pairs: &[(&str, &str)]) -> Attributes {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_first_matching_profile_wins_and_none_may_match() {
        let profiles = vec![
            profile("sensors", r#"role = "sensor""#),
            profile("ops-sensors", r#"role = "sensor" and team = "ops""#),
            profile("analysts", r#"role = "analyst" or name = "laptop-1""#),
        ];
        let pick = |a: &Attributes| select(&profiles, a).map(|p| p.name.clone());
        assert_eq!(
            pick(&attrs(&[("role", "sensor"), ("team", "ops")])).as_deref(),
            Some("sensors"),
            "order decides, not how specific a profile is"
        );
        assert_eq!(
            pick(&attrs(&[("role", "analyst")])).as_deref(),
            Some("analysts")
        );
        assert_eq!(
            pick(&attrs(&[("name", "laptop-1")])).as_deref(),
            Some("analysts")
        );
        assert_eq!(pick(&attrs(&[("role", "admin")])), None);
        assert_eq!(pick(&Attributes::new()), None);
    }

    #[test]
    fn the_implicit_profile_matches_everyone() {
        let p = vec![Arc::new(Profile::implicit(
            Duration::from_secs(5),
            Vec::new(),
            false,
        ))];
        assert_eq!(
            select(&p, &Attributes::new()).map(|p| p.name.as_str()),
            Some(DEFAULT_PROFILE)
        );
    }

    #[test]
    fn names_are_plain() {
        assert!(valid_name("sensors-15m"));
        assert!(valid_name("a.b_c"));
        for bad in ["", "two words", "x\n", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
