//! Attribute-based allow policies: small boolean expressions over a node's attributes.
//!
//! Grammar (whitespace between tokens is free):
//!
//! ```text
//! expr    := or
//! or      := and ( "or" and )*
//! and     := unary ( "and" unary )*
//! unary   := "!" unary | "(" expr ")" | "true" | "false" | compare
//! compare := ATTR ( "=" | "==" | "!=" ) VALUE
//! ATTR    := [A-Za-z_][A-Za-z0-9_.-]*
//! VALUE   := "quoted string" (\" and \\ escapes) | a bare word like ATTR
//! ```
//!
//! Example: `role = "influxdb-client" and (team = "ops" or name = "laptop-1")`. A missing
//! attribute equals nothing (`x = "a"` is false, `x != "a"` is true). The node's name is the
//! attribute `name`. Evaluation is pure, so policies are tested without any network.

use std::collections::BTreeMap;
use std::fmt;

/// A node's attributes.
pub type Attributes = BTreeMap<String, String>;

/// A parsed policy expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Const(bool),
    Eq(String, String),
    Ne(String, String),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// Why an expression did not parse: what was expected and at which byte.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("policy expression {source_text:?}: {message} at position {position}")]
pub struct PolicyError {
    pub source_text: String,
    pub message: String,
    pub position: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Str(String),
    Eq,
    Ne,
    Not,
    LParen,
    RParen,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, PolicyError> {
    let err = |position: usize, message: &str| PolicyError {
        source_text: src.to_owned(),
        message: message.to_owned(),
        position,
    };
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = src.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let (pos, c) = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push((pos, Tok::LParen));
                i += 1;
            }
            ')' => {
                out.push((pos, Tok::RParen));
                i += 1;
            }
            '=' => {
                i += 1;
                if chars.get(i).map(|x| x.1) == Some('=') {
                    i += 1;
                }
                out.push((pos, Tok::Eq));
            }
            '!' => {
                i += 1;
                if chars.get(i).map(|x| x.1) == Some('=') {
                    i += 1;
                    out.push((pos, Tok::Ne));
                } else {
                    out.push((pos, Tok::Not));
                }
            }
            '"' => {
                i += 1;
                let mut s = String::new();
                loop {
                    match chars.get(i) {
                        None => return Err(err(pos, "unterminated string")),
                        Some((_, '"')) => {
                            i += 1;
                            break;
                        }
                        Some((_, '\\')) => match chars.get(i + 1) {
                            Some((_, e @ ('"' | '\\'))) => {
                                s.push(*e);
                                i += 2;
                            }
                            _ => return Err(err(chars[i].0, "bad escape (only \\\" and \\\\)")),
                        },
                        Some((_, ch)) => {
                            s.push(*ch);
                            i += 1;
                        }
                    }
                }
                out.push((pos, Tok::Str(s)));
            }
            c if is_ident_start(c) => {
                let mut s = String::new();
                while let Some((_, ch)) = chars.get(i).filter(|x| is_ident(x.1)) {
                    s.push(*ch);
                    i += 1;
                }
                out.push((pos, Tok::Ident(s)));
            }
            _ => return Err(err(pos, &format!("unexpected character {c:?}"))),
        }
    }
    Ok(out)
}

struct Parser<'a> {
    src: &'a str,
    toks: Vec<(usize, Tok)>,
    at: usize,
}

impl Parser<'_> {
    fn err(&self, message: &str) -> PolicyError {
        PolicyError {
            source_text: self.src.to_owned(),
            message: message.to_owned(),
            position: self
                .toks
                .get(self.at)
                .map(|t| t.0)
                .unwrap_or(self.src.len()),
        }
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at).map(|t| &t.1)
    }

    fn keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(s)) if s == kw)
    }

    fn or(&mut self) -> Result<Expr, PolicyError> {
        let mut left = self.and()?;
        while self.keyword("or") {
            self.at += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, PolicyError> {
        let mut left = self.unary()?;
        while self.keyword("and") {
            self.at += 1;
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, PolicyError> {
        match self.peek().cloned() {
            Some(Tok::Not) => {
                self.at += 1;
                Ok(Expr::Not(Box::new(self.unary()?)))
            }
            Some(Tok::LParen) => {
                self.at += 1;
                let e = self.or()?;
                if self.peek() != Some(&Tok::RParen) {
                    return Err(self.err("expected ')'"));
                }
                self.at += 1;
                Ok(e)
            }
            Some(Tok::Ident(s)) if s == "true" || s == "false" => {
                self.at += 1;
                Ok(Expr::Const(s == "true"))
            }
            Some(Tok::Ident(attr)) if attr != "and" && attr != "or" => {
                self.at += 1;
                let op = match self.peek() {
                    Some(Tok::Eq) => true,
                    Some(Tok::Ne) => false,
                    _ => return Err(self.err("expected '=' or '!=' after an attribute name")),
                };
                self.at += 1;
                let value = match self.peek().cloned() {
                    Some(Tok::Str(v)) | Some(Tok::Ident(v)) => v,
                    _ => return Err(self.err("expected a value (a \"quoted string\" or a word)")),
                };
                self.at += 1;
                Ok(if op {
                    Expr::Eq(attr, value)
                } else {
                    Expr::Ne(attr, value)
                })
            }
            _ => Err(self.err("expected an attribute comparison, '!', '(' , true or false")),
        }
    }
}

impl Expr {
    /// Parses an expression.
    pub fn parse(src: &str) -> Result<Expr, PolicyError> {
        let toks = lex(src)?;
        let mut p = Parser { src, toks, at: 0 };
        let e = p.or()?;
        if p.at != p.toks.len() {
            return Err(p.err("unexpected text after the expression"));
        }
        Ok(e)
    }

    /// Evaluates the expression for a node with `attrs` (its name included as `name`).
    pub fn eval(&self, attrs: &Attributes) -> bool {
        match self {
            Expr::Const(b) => *b,
            Expr::Eq(k, v) => attrs.get(k) == Some(v),
            Expr::Ne(k, v) => attrs.get(k) != Some(v),
            Expr::Not(e) => !e.eval(attrs),
            Expr::And(a, b) => a.eval(attrs) && b.eval(attrs),
            Expr::Or(a, b) => a.eval(attrs) || b.eval(attrs),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Const(b) => write!(f, "{b}"),
            Expr::Eq(k, v) => write!(f, "{k} = {v:?}"),
            Expr::Ne(k, v) => write!(f, "{k} != {v:?}"),
            Expr::Not(e) => write!(f, "!({e})"),
            Expr::And(a, b) => write!(f, "({a} and {b})"),
            Expr::Or(a, b) => write!(f, "({a} or {b})"),
        }
    }
}

/// Parses `KEY=VALUE` (as given to `--attr`).
pub fn parse_attr(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("attribute {s:?}: expected KEY=VALUE"))?;
    let valid_key = k.chars().next().is_some_and(is_ident_start) && k.chars().all(is_ident);
    if !valid_key {
        return Err(format!(
            "attribute {s:?}: key must match [A-Za-z_][A-Za-z0-9_.-]*"
        ));
    }
    if k == "name" {
        return Err("attribute `name` is reserved: it is always the node's own name".into());
    }
    if v.len() > 256 || v.chars().any(char::is_control) {
        return Err(format!(
            "attribute {k:?}: value must be printable and at most 256 bytes"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn attrs(pairs: &[(&str, &str)]) -> Attributes {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn evaluates_the_seeds_policies() {
        let e = Expr::parse(r#"role = "influxdb-client""#).expect("parse");
        assert!(e.eval(&attrs(&[("role", "influxdb-client")])));
        assert!(!e.eval(&attrs(&[("role", "influxdb-outlet")])));
        assert!(!e.eval(&attrs(&[])));
    }

    #[test]
    fn precedence_and_grouping() {
        let e = Expr::parse(r#"a = "1" or b = "2" and c = "3""#).expect("parse");
        // and binds tighter than or
        assert!(e.eval(&attrs(&[("a", "1")])));
        assert!(!e.eval(&attrs(&[("b", "2")])));
        let e = Expr::parse(r#"(a = "1" or b = "2") and c = "3""#).expect("parse");
        assert!(!e.eval(&attrs(&[("a", "1")])));
        assert!(e.eval(&attrs(&[("a", "1"), ("c", "3")])));
        let e = Expr::parse(r#"!(team == ops) and role != "guest""#).expect("parse");
        assert!(e.eval(&attrs(&[("team", "dev")])));
        assert!(!e.eval(&attrs(&[("team", "ops")])));
        assert!(!e.eval(&attrs(&[("role", "guest")])));
        assert!(Expr::parse("true").expect("parse").eval(&attrs(&[])));
    }

    #[test]
    fn errors_say_where() {
        for bad in [
            "",
            "role",
            "role =",
            "role = \"x",
            "(a = b",
            "a = b c",
            "a = b and",
            "a $ b",
            "a = \"\\n\"",
        ] {
            let e = Expr::parse(bad).expect_err(bad);
            assert!(e.position <= bad.len(), "{e}");
        }
    }

    #[test]
    fn attribute_flags() {
        assert_eq!(parse_attr("role=x"), Ok(("role".into(), "x".into())));
        assert!(parse_attr("role").is_err());
        assert!(parse_attr("name=x").is_err());
        assert!(parse_attr("9x=y").is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,64}") {
            let _ = Expr::parse(&s);
        }

        #[test]
        fn display_round_trips(
            // Keywords are not attribute names (the grammar reserves them).
            k in "[a-z]{1,8}".prop_filter("a keyword", |k| !["and", "or", "not"].contains(&k.as_str())),
            v in "[ -~]{0,12}",
        ) {
            let e = Expr::Or(
                Box::new(Expr::Eq(k.clone(), v.clone())),
                Box::new(Expr::Not(Box::new(Expr::Ne(k, v)))),
            );
            let again = Expr::parse(&e.to_string()).expect("reparse");
            prop_assert_eq!(again, e);
        }
    }
}
