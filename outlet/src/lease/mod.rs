//! Lease manager (issue 5).
