//! The published InfluxDB 2 API contract, trimmed to what the lease path uses, and a validator
//! for the JSON Schema subset it is written in, so that the contract server
//! ([`crate::influx2`]) and the outlet cannot drift from the real API unnoticed.
//!
//! The fixture `tests/fixtures/influxdb2-openapi.json` names its source (influxdata/openapi,
//! commit and contract versions for OSS and Cloud). The keywords understood are those it uses:
//! `$ref` (to `#/schemas/<name>`), `allOf`, `type`, `enum`, `required`, `properties`, `items`,
//! `minItems`, `readOnly` (a read-only property in a request body is a violation) and `format`
//! (`date-time` checked loosely). Properties the schema does not list are allowed, as in the
//! contract.

use serde_json::Value;
use std::sync::OnceLock;

/// Which contract to check against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    Oss,
    Cloud,
}

/// Whether a body is sent to the server (read-only properties forbidden) or by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

fn fixture() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        serde_json::from_str(include_str!("../fixtures/influxdb2-openapi.json"))
            .expect("the OpenAPI fixture is JSON")
    })
}

/// The fixture's `_source` (where the contract comes from).
pub fn source() -> &'static Value {
    &fixture()["_source"]
}

/// Whether `template` (`/api/v2/authorizations/{authID}`) matches `path`.
fn path_matches(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(a, b)| (a.starts_with('{') && !b.is_empty()) || a == b)
}

/// The operation the contract documents for `method path`, if any.
pub fn operation(contract: Contract, method: &str, path: &str) -> Option<&'static Value> {
    let key = match contract {
        Contract::Oss => "oss",
        Contract::Cloud => "cloud",
    };
    fixture()["operations"][key].as_array()?.iter().find(|op| {
        op["method"] == method && op["path"].as_str().is_some_and(|t| path_matches(t, path))
    })
}

/// Checks a request body against the operation's request schema. Operations without one, or
/// not in the fixture, are not checked.
pub fn check_request(contract: Contract, method: &str, path: &str, body: &Value) -> Vec<String> {
    let Some(op) = operation(contract, method, path) else {
        return Vec::new();
    };
    match op["request"].as_str() {
        Some(schema) => validate(schema, body, Direction::Request)
            .into_iter()
            .map(|e| format!("{} request: {e}", op["id"].as_str().unwrap_or("?")))
            .collect(),
        None => Vec::new(),
    }
}

/// Checks a response against the operation: the status must be documented (or covered by
/// `default`), and a body must match its schema (`null` schema: no body).
pub fn check_response(
    contract: Contract,
    method: &str,
    path: &str,
    status: u16,
    body: Option<&Value>,
) -> Vec<String> {
    let Some(op) = operation(contract, method, path) else {
        return Vec::new();
    };
    let id = op["id"].as_str().unwrap_or("?");
    let responses = &op["responses"];
    let schema = match responses.get(status.to_string()) {
        Some(s) => s,
        None if status >= 400 => match responses.get("default") {
            Some(s) => s,
            None => return vec![format!("{id}: status {status} is not in the contract")],
        },
        None => {
            return vec![format!(
                "{id}: success status {status} is not in the contract"
            )]
        }
    };
    match (schema.as_str(), body) {
        (None, None) => Vec::new(),
        (None, Some(_)) => vec![format!("{id} {status}: the contract has no body here")],
        (Some(s), None) => vec![format!("{id} {status}: a {s} body is missing")],
        (Some(s), Some(b)) => validate(s, b, Direction::Response)
            .into_iter()
            .map(|e| format!("{id} {status}: {e}"))
            .collect(),
    }
}

/// Validates `value` against the named schema; returns the violations found.
pub fn validate(schema_name: &str, value: &Value, dir: Direction) -> Vec<String> {
    let mut errors = Vec::new();
    match fixture()["schemas"].get(schema_name) {
        Some(s) => check(s, value, dir, "$", &mut errors),
        None => errors.push(format!("no schema {schema_name:?} in the fixture")),
    }
    errors
}

fn resolve(schema: &Value) -> &Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.trim_start_matches("#/schemas/");
            fixture()["schemas"].get(name).unwrap_or(&Value::Null)
        }
        None => schema,
    }
}

fn type_ok(ty: &str, v: &Value) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    }
}

/// `2024-05-17T09:02:58Z` and the like (RFC 3339), checked by shape.
fn is_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b't')
        && b[13] == b':'
        && b[16] == b':'
        && (s.ends_with('Z') || s[19..].contains(['+', '-']))
}

fn check(schema: &Value, v: &Value, dir: Direction, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(schema);
    if schema.is_null() {
        errors.push(format!("{at}: unresolved $ref"));
        return;
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(s, v, dir, at, errors);
        }
    }
    if let Some(ty) = schema.get("type").and_then(Value::as_str) {
        if !type_ok(ty, v) {
            errors.push(format!("{at}: expected {ty}, got {v}"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(v) {
            errors.push(format!(
                "{at}: {v} is not one of {}",
                Value::Array(allowed.clone())
            ));
        }
    }
    if schema.get("format").and_then(Value::as_str) == Some("date-time") {
        if let Some(s) = v.as_str() {
            if !is_date_time(s) {
                errors.push(format!("{at}: {s:?} is not a date-time"));
            }
        }
    }
    if let Some(obj) = v.as_object() {
        if let Some(req) = schema.get("required").and_then(Value::as_array) {
            for k in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(k) {
                    errors.push(format!("{at}: required property {k:?} is missing"));
                }
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, sub) in props {
                let Some(x) = obj.get(k) else { continue };
                let read_only =
                    sub.get("readOnly") == Some(&Value::Bool(true)) && sub.get("$ref").is_none();
                if dir == Direction::Request && read_only {
                    errors.push(format!("{at}.{k}: read-only, must not be sent"));
                }
                check(sub, x, dir, &format!("{at}.{k}"), errors);
            }
        }
    }
    if let Some(items) = v.as_array() {
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
            if (items.len() as u64) < min {
                errors.push(format!("{at}: fewer than {min} items"));
            }
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, x) in items.iter().enumerate() {
                check(item_schema, x, dir, &format!("{at}[{i}]"), errors);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_fixture_names_its_source_and_resolves() {
        assert!(source()["repository"]
            .as_str()
            .is_some_and(|r| r.contains("influxdata/openapi")));
        let schemas = fixture()["schemas"].as_object().expect("schemas");
        let text = fixture()["schemas"].to_string();
        for part in text.split("\"#/schemas/").skip(1) {
            let name = part.split('"').next().unwrap_or("");
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
    }

    #[test]
    fn authorization_requests_are_checked() {
        let good = json!({"orgID":"0123456789abcdef","status":"active","description":"d",
            "permissions":[{"action":"write","resource":{"type":"buckets","id":"00000000000000aa"}}]});
        assert!(validate("AuthorizationPostRequest", &good, Direction::Request).is_empty());
        for bad in [
            json!({"orgID":"0123456789abcdef","permissions":[]}),
            json!({"permissions":[{"action":"read","resource":{"type":"buckets"}}]}),
            json!({"orgID":"x","permissions":[{"action":"delete","resource":{"type":"buckets"}}]}),
            json!({"orgID":"x","permissions":[{"action":"read","resource":{"type":"bukkits"}}]}),
            json!({"orgID":"x","status":"gone","permissions":[{"action":"read","resource":{"type":"buckets"}}]}),
        ] {
            assert!(
                !validate("AuthorizationPostRequest", &bad, Direction::Request).is_empty(),
                "{bad}"
            );
        }
        // A read-only property is fine in an answer, not in a request.
        let with_token = json!({"orgID":"x","token":"t",
            "permissions":[{"action":"read","resource":{"type":"buckets"}}]});
        assert!(validate("Authorization", &with_token, Direction::Response).is_empty());
        assert!(!validate("Authorization", &with_token, Direction::Request).is_empty());
    }

    #[test]
    fn responses_must_be_documented() {
        let c = Contract::Oss;
        let gone = json!({"code":"not found","message":"authorization not found"});
        assert!(check_response(
            c,
            "DELETE",
            "/api/v2/authorizations/00000000000000aa",
            404,
            Some(&gone)
        )
        .is_empty());
        assert!(!check_response(
            c,
            "DELETE",
            "/api/v2/authorizations/00000000000000aa",
            200,
            None
        )
        .is_empty());
        assert!(!check_response(
            c,
            "GET",
            "/api/v2/authorizations",
            401,
            Some(&json!({"code":"forbidden"}))
        )
        .is_empty());
        assert!(!check_response(
            c,
            "POST",
            "/api/v2/authorizations",
            400,
            Some(&json!({"message":"no code"}))
        )
        .is_empty());
        assert!(operation(Contract::Cloud, "GET", "/health").is_none());
        assert!(operation(Contract::Oss, "GET", "/health").is_some());
    }
}
