//! How the relay's connection to the fleet's shared state is doing, for `/readyz`, `/metrics`
//! and `postern-relay status`: the members last counted, and etcd failures by the operation
//! that met them, with the last one's message.
//!
//! A backend that talks to a store (etcd) keeps one [`Health`] and records into it where its
//! requests fail; readers take a [`HealthView`] copy. The embedded state has none: nothing it
//! does can fail for want of a network.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// What a failed etcd request was for; one `postern_relay_etcd_failures_total{op=...}` series
/// each, so an operator sees whether only enrollment suffers or the follower itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reading and watching revocations and drains (every relay, all the time).
    Follow,
    /// Keeping this relay's membership lease and load.
    Membership,
    /// Taking a ticket's use and recording the identity.
    Enroll,
    /// Checking an identity before renewing its certificate.
    Renew,
    /// Creating a ticket.
    Ticket,
    /// Recording a revocation.
    Revoke,
    /// Recording a drain or its end.
    Drain,
    /// Reading lists (tickets, identities, members) for the admin API and the CLI.
    Read,
}

impl Op {
    pub const ALL: [Op; 8] = [
        Op::Follow,
        Op::Membership,
        Op::Enroll,
        Op::Renew,
        Op::Ticket,
        Op::Revoke,
        Op::Drain,
        Op::Read,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Op::Follow => "follow",
            Op::Membership => "membership",
            Op::Enroll => "enroll",
            Op::Renew => "renew",
            Op::Ticket => "ticket",
            Op::Revoke => "revoke",
            Op::Drain => "drain",
            Op::Read => "read",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Health {
    failures: [AtomicU64; Op::ALL.len()],
    /// Live members as last counted, once `counted`.
    members: AtomicU64,
    counted: std::sync::atomic::AtomicBool,
    /// The last failure: when (Unix ms) and what etcd said (never a credential).
    last_error: Mutex<Option<(u64, String)>>,
}

/// A copy of [`Health`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthView {
    /// Members of the fleet as last counted (`None` before the first count).
    pub members: Option<u64>,
    /// Failed etcd requests so far, by [`Op::label`], every op listed.
    pub failures: Vec<(&'static str, u64)>,
    /// The last failure: when (Unix ms) and its message.
    pub last_error: Option<(u64, String)>,
}

impl Health {
    /// Records a failed request of kind `op`.
    pub fn fail(&self, op: Op, error: &dyn std::fmt::Display) {
        self.failures[op.index()].fetch_add(1, Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((crate::authority::now_ms(), error.to_string()));
    }

    /// Passes `r` through, recording it when it is an etcd failure (configuration and
    /// internal errors are not the cluster's fault and are not counted).
    pub fn tally<T>(
        &self,
        op: Op,
        r: Result<T, super::FleetError>,
    ) -> Result<T, super::FleetError> {
        if let Err(e @ super::FleetError::Etcd(_)) = &r {
            self.fail(op, e);
        }
        r
    }

    /// Records the number of live members just read.
    pub fn set_members(&self, n: u64) {
        self.members.store(n, Relaxed);
        self.counted.store(true, Relaxed);
    }

    pub fn view(&self) -> HealthView {
        HealthView {
            members: self
                .counted
                .load(Relaxed)
                .then(|| self.members.load(Relaxed)),
            failures: Op::ALL
                .iter()
                .map(|op| (op.label(), self.failures[op.index()].load(Relaxed)))
                .collect(),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::FleetError;

    #[test]
    fn failures_are_counted_by_op_and_only_for_etcd() {
        let h = Health::default();
        assert_eq!(h.view().members, None);
        assert!(h.view().failures.iter().all(|(_, n)| *n == 0));
        let _ = h.tally::<()>(Op::Revoke, Err(FleetError::Etcd("no leader".into())));
        let _ = h.tally::<()>(Op::Revoke, Err(FleetError::Etcd("timed out".into())));
        let _ = h.tally::<()>(Op::Ticket, Err(FleetError::NoAuthority));
        let _ = h.tally(Op::Read, Ok(()));
        h.set_members(3);
        let v = h.view();
        let get = |l: &str| v.failures.iter().find(|(k, _)| *k == l).map(|(_, n)| *n);
        assert_eq!(
            (get("revoke"), get("ticket"), get("read")),
            (Some(2), Some(0), Some(0))
        );
        assert_eq!(v.members, Some(3));
        let (_, msg) = v.last_error.expect("last error");
        assert!(msg.contains("timed out") && msg.contains("etcd"), "{msg}");
        let labels: Vec<&str> = Op::ALL.iter().map(|o| o.label()).collect();
        let mut unique = labels.clone();
        unique.dedup();
        assert_eq!(labels.len(), unique.len());
    }
}
