//! Routing upgrade requests to gears by path (SPEC section 3): literal segments,
//! `:name` placeholders for one segment, and a trailing `*name` wildcard for the rest.
//!
//! Matching is exact on segments: `/ws` does not match `/ws/`. When several routes
//! match, the most specific wins: at the first segment where they differ, a literal
//! beats a placeholder, which beats a wildcard. Parameters are percent-decoded.

use std::borrow::Cow;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
    Rest(String),
}

/// A path pattern that failed to parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRoute {
    /// The pattern.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for InvalidRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid route {:?}: {}", self.pattern, self.reason)
    }
}

impl std::error::Error for InvalidRoute {}

/// A parsed path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    segments: Vec<Segment>,
}

impl Pattern {
    /// Parses `/a/:b/*c`.
    pub fn parse(pattern: &str) -> Result<Pattern, InvalidRoute> {
        let bad = |reason| InvalidRoute {
            pattern: pattern.to_owned(),
            reason,
        };
        let rest = pattern
            .strip_prefix('/')
            .ok_or(bad("must start with '/'"))?;
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let mut segments = Vec::with_capacity(parts.len());
        let mut names: Vec<&str> = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let seg = if let Some(name) = part.strip_prefix(':') {
                Segment::Param(name.to_owned())
            } else if let Some(name) = part.strip_prefix('*') {
                if i + 1 != parts.len() {
                    return Err(bad("a '*' wildcard must be the last segment"));
                }
                Segment::Rest(name.to_owned())
            } else {
                if part.contains([':', '*', '?', '#']) {
                    return Err(bad("':' and '*' only start a segment; no '?' or '#'"));
                }
                Segment::Literal((*part).to_owned())
            };
            if let Segment::Param(name) | Segment::Rest(name) = &seg {
                if name.is_empty() {
                    return Err(bad("placeholders need a name"));
                }
                if names.contains(&name.as_str()) {
                    return Err(bad("a placeholder name is used twice"));
                }
                names.push(&part[1..]);
            }
            segments.push(seg);
        }
        Ok(Pattern {
            source: pattern.to_owned(),
            segments,
        })
    }

    /// The pattern with placeholder names left out: two patterns of the same shape
    /// match the same paths.
    fn shape(&self) -> Vec<Option<&str>> {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => Some(l.as_str()),
                Segment::Param(_) => None,
                Segment::Rest(_) => Some("*"),
            })
            .collect()
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Matches `path` (no query); on success returns the parameters and a specificity
    /// key (higher is more specific).
    fn matches(&self, path: &str) -> Option<(Params, Vec<u8>)> {
        let rest = path.strip_prefix('/')?;
        let mut parts = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect::<Vec<_>>()
        };
        let mut params = Vec::new();
        let mut rank = Vec::with_capacity(self.segments.len());
        for (i, seg) in self.segments.iter().enumerate() {
            match seg {
                Segment::Literal(lit) => {
                    if parts.get(i).map(|p| decode(p)).as_deref() != Some(lit.as_str()) {
                        return None;
                    }
                    rank.push(3);
                }
                Segment::Param(name) => {
                    let part = parts.get(i).filter(|p| !p.is_empty())?;
                    params.push((name.clone(), decode(part).into_owned()));
                    rank.push(2);
                }
                Segment::Rest(name) => {
                    let rest = parts.split_off(i.min(parts.len())).join("/");
                    params.push((name.clone(), decode(&rest).into_owned()));
                    rank.push(1);
                    return Some((params, rank));
                }
            }
        }
        (parts.len() == self.segments.len()).then_some((params, rank))
    }
}

/// Route parameters, in pattern order.
type Params = Vec<(String, String)>;

fn decode(s: &str) -> Cow<'_, str> {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy()
}

/// Routes to targets of type `T` (a gear index, say).
#[derive(Debug, Clone)]
pub struct Router<T> {
    routes: Vec<(Pattern, T)>,
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Router { routes: Vec::new() }
    }
}

/// A successful match.
#[derive(Debug, PartialEq, Eq)]
pub struct Matched<'r, T> {
    /// The target.
    pub target: &'r T,
    /// The pattern that matched.
    pub pattern: &'r str,
    /// Placeholder and wildcard values, in pattern order, percent-decoded.
    pub params: Params,
}

impl<T> Router<T> {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// Mounts `target` on `pattern`. The same pattern twice is an error.
    pub fn mount(&mut self, pattern: &str, target: T) -> Result<(), InvalidRoute> {
        let p = Pattern::parse(pattern)?;
        if self.routes.iter().any(|(q, _)| q.shape() == p.shape()) {
            return Err(InvalidRoute {
                pattern: pattern.to_owned(),
                reason: "already mounted",
            });
        }
        self.routes.push((p, target));
        Ok(())
    }

    /// The most specific route for `path`, or `None` (answered with 404).
    pub fn find(&self, path: &str) -> Option<Matched<'_, T>> {
        let mut best: Option<(Vec<u8>, Matched<'_, T>)> = None;
        for (pattern, target) in &self.routes {
            if let Some((params, rank)) = pattern.matches(path)
                && best.as_ref().is_none_or(|(r, _)| rank > *r)
            {
                let m = Matched {
                    target,
                    pattern: pattern.as_str(),
                    params,
                };
                best = Some((rank, m));
            }
        }
        best.map(|(_, m)| m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router<&'static str> {
        let mut r = Router::new();
        r.mount("/", "root").unwrap();
        r.mount("/echo", "echo").unwrap();
        r.mount("/rooms/:room", "room").unwrap();
        r.mount("/rooms/lobby", "lobby").unwrap();
        r.mount("/rooms/:room/users/:user", "user").unwrap();
        r.mount("/files/*rest", "files").unwrap();
        r
    }

    fn find(path: &str) -> Option<(&'static str, Vec<(String, String)>)> {
        let r = router();
        r.find(path).map(|m| (*m.target, m.params))
    }

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn literals_placeholders_wildcards() {
        assert_eq!(find("/"), Some(("root", vec![])));
        assert_eq!(find("/echo"), Some(("echo", vec![])));
        assert_eq!(find("/echo/"), None);
        assert_eq!(find("/echoes"), None);
        assert_eq!(find("/rooms/a%20b"), Some(("room", p(&[("room", "a b")]))));
        assert_eq!(
            find("/rooms/"),
            None,
            "a placeholder needs a non-empty segment"
        );
        assert_eq!(
            find("/rooms/lobby"),
            Some(("lobby", vec![])),
            "literal beats placeholder"
        );
        assert_eq!(
            find("/rooms/x/users/y"),
            Some(("user", p(&[("room", "x"), ("user", "y")])))
        );
        assert_eq!(
            find("/files/a/b/c.txt"),
            Some(("files", p(&[("rest", "a/b/c.txt")])))
        );
        assert_eq!(find("/files"), Some(("files", p(&[("rest", "")]))));
        assert_eq!(find("/nothing"), None);
        assert_eq!(find("relative"), None);
    }

    #[test]
    fn bad_patterns() {
        for bad in ["ws", "/a/*rest/b", "/:", "/*", "/a/:x/:x", "/a:b", "/a?b"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        let mut r = router();
        assert!(r.mount("/rooms/:other", "dup").is_err(), "same shape twice");
    }
}
