//! Who may register and who may reach each service: attribute expressions from the relay's
//! config. Default: deny.

use postern_proto::name::{NodeName, ServiceName};
use postern_proto::policy::{Attributes, Expr, PolicyError};
use serde::Deserialize;

/// One `[[policy]]` table in the relay's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PolicyFile {
    /// Service name, or `*` for every service.
    pub service: String,
    /// Expression an outlet must satisfy to register the service.
    pub register: Option<String>,
    /// Expression an inlet must satisfy to get a route to the service.
    pub route: Option<String>,
}

#[derive(Debug, Clone)]
struct Rule {
    service: Option<ServiceName>,
    register: Option<Expr>,
    route: Option<Expr>,
}

/// The relay's policies.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    rules: Vec<Rule>,
}

/// A policy decision and the rule that made it (for logs and the audit trail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub rule: String,
}

/// Which action is being decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Register,
    Route,
}

impl PolicySet {
    /// Allows everything (tests, or a deliberately open relay).
    pub fn allow_all() -> Self {
        Self {
            rules: vec![Rule {
                service: None,
                register: Some(Expr::Const(true)),
                route: Some(Expr::Const(true)),
            }],
        }
    }

    /// Parses the config's `[[policy]]` tables; errors name the table and key.
    pub fn from_config(tables: &[PolicyFile]) -> Result<Self, String> {
        let mut rules = Vec::new();
        for (i, t) in tables.iter().enumerate() {
            let service = if t.service == "*" {
                None
            } else {
                Some(
                    ServiceName::new(&t.service)
                        .map_err(|e| format!("policy[{i}].service: {e}"))?,
                )
            };
            let parse = |key: &str, s: &Option<String>| -> Result<Option<Expr>, String> {
                s.as_deref()
                    .map(Expr::parse)
                    .transpose()
                    .map_err(|e: PolicyError| format!("policy[{i}].{key}: {e}"))
            };
            rules.push(Rule {
                service,
                register: parse("register", &t.register)?,
                route: parse("route", &t.route)?,
            });
        }
        Ok(Self { rules })
    }

    /// True when no rule exists (everything will be refused).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides whether `node` with `attrs` may do `action` on `service`.
    pub fn decide(
        &self,
        action: Action,
        service: &ServiceName,
        node: &NodeName,
        attrs: &Attributes,
    ) -> Decision {
        let mut all = attrs.clone();
        all.insert("name".into(), node.to_string());
        for rule in &self.rules {
            if rule.service.as_ref().is_some_and(|s| s != service) {
                continue;
            }
            let expr = match action {
                Action::Register => &rule.register,
                Action::Route => &rule.route,
            };
            if let Some(e) = expr {
                if e.eval(&all) {
                    let scope = rule
                        .service
                        .as_ref()
                        .map_or("*".to_string(), |s| s.to_string());
                    return Decision {
                        allowed: true,
                        rule: format!("service {scope}: {e}"),
                    };
                }
            }
        }
        Decision {
            allowed: false,
            rule: "default deny (no policy allows it)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(role: &str) -> Attributes {
        [("role".to_string(), role.to_string())].into()
    }

    #[test]
    fn default_deny_and_matching_rules() {
        let svc = ServiceName::new("influxdb").expect("name");
        let other = ServiceName::new("other").expect("name");
        let node = NodeName::new("n1").expect("name");
        let empty = PolicySet::default();
        assert!(
            !empty
                .decide(Action::Route, &svc, &node, &attrs("x"))
                .allowed
        );
        let p = PolicySet::from_config(&[PolicyFile {
            service: "influxdb".into(),
            register: Some(r#"role = "influxdb-outlet""#.into()),
            route: Some(r#"role = "influxdb-client" or name = "admin-laptop""#.into()),
        }])
        .expect("policy");
        assert!(
            p.decide(Action::Register, &svc, &node, &attrs("influxdb-outlet"))
                .allowed
        );
        assert!(
            !p.decide(Action::Register, &svc, &node, &attrs("influxdb-client"))
                .allowed
        );
        assert!(
            p.decide(Action::Route, &svc, &node, &attrs("influxdb-client"))
                .allowed
        );
        assert!(
            !p.decide(Action::Route, &other, &node, &attrs("influxdb-client"))
                .allowed
        );
        let admin = NodeName::new("admin-laptop").expect("name");
        assert!(
            p.decide(Action::Route, &svc, &admin, &Attributes::new())
                .allowed
        );
    }

    #[test]
    fn bad_expressions_name_the_key() {
        let e = PolicySet::from_config(&[PolicyFile {
            service: "db".into(),
            register: None,
            route: Some("role =".into()),
        }])
        .expect_err("bad");
        assert!(e.contains("policy[0].route"), "{e}");
    }
}
