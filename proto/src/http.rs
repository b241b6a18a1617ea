//! HTTP/1.1 request filter (sans-IO). Owned by the HTTP filter work; see issue 5.
