//! containerd's filter syntax (its `filters` package), applied to [`Info`].
//!
//! ```text
//! selectors := selector ("," selector)*
//! selector  := fieldpath (operator value)?
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_-]+
//! operator  := "==" | "!=" | "~="
//! value     := quoted | [^\s,]+
//! quoted    := Go-style string quoted with ", / or |
//! ```
//!
//! Whitespace between tokens is skipped. Several filters are OR-ed, the selectors of one filter
//! are AND-ed.

use regex::{Regex, RegexBuilder};

use crate::{Error, Info};

/// Largest compiled regular expression accepted in a `~=` selector.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A parsed list of filters: matches when any of its filters does (or when there is none).
#[derive(Debug)]
pub(crate) struct Filters {
    any: Vec<Vec<Selector>>,
}

#[derive(Debug)]
struct Selector {
    field: Field,
    op: Op,
}

#[derive(Debug)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

impl Filters {
    /// Parses the request's filters; any error is `InvalidArgument`.
    pub(crate) fn parse(filters: &[String]) -> Result<Filters, Error> {
        let any = filters
            .iter()
            .map(|f| parse_one(f))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Filters { any })
    }

    /// Whether `info` passes.
    pub(crate) fn matches(&self, info: &Info) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value = match &self.field {
            Field::Name => Some(info.name.as_str()),
            Field::Parent => Some(info.parent.as_str()),
            Field::Kind => Some(info.kind.as_str()),
            Field::Label(key) => info.labels.get(key).map(String::as_str),
        };
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(want) => value == Some(want.as_str()),
            Op::NotEqual(want) => value.unwrap_or("") != want,
            Op::Matches(re) => re.is_match(value.unwrap_or("")),
        }
    }
}

/// Parses one filter: comma-separated selectors, all of which must match. `""` matches all.
fn parse_one(input: &str) -> Result<Vec<Selector>, Error> {
    if input.is_empty() {
        return Ok(Vec::new());
    }
    let mut p = Parser { input, pos: 0 };
    let mut selectors = Vec::new();
    loop {
        selectors.push(p.selector()?);
        p.skip_space();
        match p.peek() {
            None => return Ok(selectors),
            Some(',') => p.bump(),
            Some(c) => return Err(p.error(&format!("unexpected {c:?}"))),
        }
    }
}

struct Parser<'a> {
    input: &'a str,
    /// Byte offset of the next character.
    pos: usize,
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '~')
}

fn is_quote(c: char) -> bool {
    matches!(c, '"' | '/' | '|')
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn bump(&mut self) {
        if let Some(c) = self.peek() {
            self.pos += c.len_utf8();
        }
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
    }

    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> &str {
        let start = self.pos;
        while self.peek().is_some_and(&keep) {
            self.bump();
        }
        &self.input[start..self.pos]
    }

    fn error(&self, msg: &str) -> Error {
        Error::InvalidArgument(format!(
            "filter {:?}: {msg} at offset {}",
            self.input, self.pos
        ))
    }

    fn selector(&mut self) -> Result<Selector, Error> {
        let start = self.pos;
        let mut path = vec![self.field()?];
        loop {
            self.skip_space();
            if self.peek() != Some('.') {
                break;
            }
            self.bump();
            path.push(self.field()?);
        }
        let field = match path.as_slice() {
            [f] if f == "name" => Field::Name,
            [f] if f == "parent" => Field::Parent,
            [f] if f == "kind" => Field::Kind,
            [f, key @ ..] if f == "labels" && !key.is_empty() => Field::Label(key.join(".")),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "filter {:?}: unknown field {:?} (name, parent, kind, labels.KEY)",
                    self.input,
                    self.input[start..self.pos].trim()
                )));
            }
        };
        self.skip_space();
        let op = match self.peek() {
            None | Some(',') => Op::Present,
            Some(c) if is_operator_char(c) => {
                let op = self.take_while(is_operator_char).to_owned();
                self.skip_space();
                let value = self.value()?;
                match op.as_str() {
                    "==" => Op::Equal(value),
                    "!=" => Op::NotEqual(value),
                    "~=" => Op::Matches(
                        RegexBuilder::new(&value)
                            .size_limit(REGEX_SIZE_LIMIT)
                            .build()
                            .map_err(|e| self.error(&format!("bad regular expression: {e}")))?,
                    ),
                    _ => return Err(self.error(&format!("unsupported operator {op:?}"))),
                }
            }
            Some(c) => return Err(self.error(&format!("expected an operator, found {c:?}"))),
        };
        Ok(Selector { field, op })
    }

    fn field(&mut self) -> Result<String, Error> {
        self.skip_space();
        match self.peek() {
            Some(q) if is_quote(q) => self.quoted(q),
            Some(c) if is_field_char(c) => Ok(self.take_while(is_field_char).to_owned()),
            _ => Err(self.error("expected a field or a quoted string")),
        }
    }

    fn value(&mut self) -> Result<String, Error> {
        match self.peek() {
            Some(q) if is_quote(q) => self.quoted(q),
            Some(c) if c != ',' && !c.is_whitespace() && !c.is_control() => Ok(self
                .take_while(|c| c != ',' && !c.is_whitespace() && !c.is_control())
                .to_owned()),
            _ => Err(self.error("expected a value or a quoted string")),
        }
    }

    /// A string between `quote`s with Go's escapes (`\"` only inside `"…"`, `\/` inside `/…/`,
    /// `\|` inside `|…|`).
    fn quoted(&mut self, quote: char) -> Result<String, Error> {
        self.bump();
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error("quoted string not terminated"));
            };
            self.bump();
            if c == quote {
                break;
            }
            match c {
                '\n' => return Err(self.error("newline in quoted string")),
                '\\' => self.escape(quote, &mut out)?,
                c => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        String::from_utf8(out).map_err(|_| self.error("quoted string is not UTF-8"))
    }

    fn escape(&mut self, quote: char, out: &mut Vec<u8>) -> Result<(), Error> {
        let Some(c) = self.peek() else {
            return Err(self.error("quoted string not terminated"));
        };
        self.bump();
        let simple = match c {
            'a' => Some(b'\x07'),
            'b' => Some(b'\x08'),
            'f' => Some(b'\x0c'),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            'v' => Some(b'\x0b'),
            '\\' => Some(b'\\'),
            c if c == quote => Some(c as u8),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            return Ok(());
        }
        match c {
            'x' => {
                let v = self.digits(16, 2)?;
                out.push(v as u8);
            }
            '0'..='7' => {
                let v = (c as u32 - '0' as u32) * 64 + self.digits(8, 2)?;
                let b = u8::try_from(v).map_err(|_| self.error("octal escape above 255"))?;
                out.push(b);
            }
            'u' | 'U' => {
                let n = if c == 'u' { 4 } else { 8 };
                let v = self.digits(16, n)?;
                let ch = char::from_u32(v).ok_or_else(|| self.error("bad unicode escape"))?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            }
            _ => return Err(self.error(&format!("illegal escape \\{c}"))),
        }
        Ok(())
    }

    /// Exactly `n` digits in `radix`.
    fn digits(&mut self, radix: u32, n: usize) -> Result<u32, Error> {
        let mut v: u32 = 0;
        for _ in 0..n {
            let d = self
                .peek()
                .and_then(|c| c.to_digit(radix))
                .ok_or_else(|| self.error("bad numeric escape"))?;
            self.bump();
            v = v.wrapping_mul(radix).wrapping_add(d);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kind;
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.into(),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
        }
    }

    fn m(filters: &[&str], i: &Info) -> bool {
        let f: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filters::parse(&f).unwrap().matches(i)
    }

    fn bad(filter: &str) {
        match Filters::parse(&[filter.to_string()]) {
            Err(Error::InvalidArgument(_)) => {}
            other => panic!("{filter:?}: expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn selectors() {
        let a = info(
            "a",
            "base",
            Kind::Active,
            &[("x", "1"), ("containerd.io/gc.root", "t"), ("a.b", "dot")],
        );
        assert!(m(&[], &a));
        assert!(m(&[""], &a));
        assert!(m(&["name==a"], &a));
        assert!(!m(&["name==b"], &a));
        assert!(m(&["name!=b"], &a));
        assert!(m(&["  name == a , kind==active "], &a));
        assert!(!m(&["name==a,kind==committed"], &a));
        assert!(m(&["name==b", "kind==active"], &a));
        assert!(m(&["parent==base"], &a));
        assert!(m(&["labels.x"], &a));
        assert!(!m(&["labels.y"], &a));
        assert!(m(&["labels.y!=1"], &a));
        assert!(m(&["labels.x==1"], &a));
        assert!(m(&[r#"labels."containerd.io/gc.root"==t"#], &a));
        assert!(m(&[r#"labels."containerd.io/gc.root""#], &a));
        assert!(m(&["labels.a.b==dot"], &a));
        assert!(m(&[r#"labels."a.b"=="dot""#], &a));
        assert!(m(&["name~=^a$"], &a));
        assert!(m(&["name~=/^[a-c]$/"], &a));
        assert!(m(&["name~=|^a|"], &a));
        assert!(!m(&["name~=^b"], &a));
        assert!(m(&[r#"name=="\x61""#], &a));
        assert!(m(&[r#"name=="\u0061""#], &a));
        assert!(m(&[r#""name"==a"#], &a));
    }

    #[test]
    fn malformed() {
        for f in [
            "foo==a",
            "labels",
            "labels==x",
            "name.x==a",
            "name=a",
            "name===a",
            "name==",
            "name==a,",
            ",name==a",
            "name==a b",
            r#"labels."x==1"#,
            r#"name=="\q""#,
            "name~=(",
            "==a",
            "name ! a",
            ".name",
            r#"name=="\xff""#,
        ] {
            bad(f);
        }
    }
}
