//! HTTP filter I/O glue (issue 5).
