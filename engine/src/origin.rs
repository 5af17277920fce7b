//! Which web pages may open a websocket connection to a gear: the `Origin` check
//! against cross-site WebSocket hijacking.
//!
//! A browser sends cookies and HTTP authentication with a websocket upgrade to any
//! site, whatever page opened it, and tells the server which page that was in `Origin`
//! (browsers always send it on websocket upgrades; other clients usually do not). Without
//! a check, any page a logged-in user visits could talk to the gear as that user. So by
//! default a gear accepts an upgrade only if its `Origin` names the same host (and
//! port) as its `Host` (the page was served by this server), or if it has no `Origin`
//! at all (not a browser), as gorilla/websocket and Phoenix do; anything else gets 403.

/// The pages allowed to connect to a gear, by their `Origin`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OriginPolicy {
    /// An `Origin` with the request's `Host` (the default): pages of this server.
    #[default]
    SameHost,
    /// Pages of this server, and these origins (`scheme://host[:port]`, compared
    /// without case; a default port may be left out).
    SameHostOr(Vec<String>),
    /// Any page (the gear checks for itself, or serves public data only).
    Any,
}

impl OriginPolicy {
    /// A policy from a list of allowed origins as an operator writes it: empty: same
    /// host only; containing `*`: any; else same host or these.
    pub fn from_list(origins: &[String]) -> OriginPolicy {
        if origins.iter().any(|o| o.trim() == "*") {
            OriginPolicy::Any
        } else if origins.is_empty() {
            OriginPolicy::SameHost
        } else {
            OriginPolicy::SameHostOr(origins.iter().map(|o| normalize(o)).collect())
        }
    }

    /// Whether an upgrade with this `Origin` (`None`: the header is absent) and
    /// `Host` may go on.
    pub fn allows(&self, origin: Option<&[u8]>, host: Option<&[u8]>) -> bool {
        let Some(origin) = origin else {
            return true; // not a browser
        };
        if matches!(self, OriginPolicy::Any) {
            return true;
        }
        let Ok(origin) = std::str::from_utf8(origin) else {
            return false;
        };
        let origin = normalize(origin);
        if let Some(host) = host.and_then(|h| std::str::from_utf8(h).ok())
            && same_host(&origin, host)
        {
            return true;
        }
        match self {
            OriginPolicy::SameHostOr(list) => list.contains(&origin),
            _ => false,
        }
    }
}

/// `scheme://host[:port]` in lower case, without a default port or a trailing slash.
fn normalize(origin: &str) -> String {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let Some((scheme, rest)) = origin.split_once("://") else {
        return origin;
    };
    let default = match scheme {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => return origin,
    };
    match rest.strip_suffix(default) {
        Some(bare) => format!("{scheme}://{bare}"),
        None => origin,
    }
}

/// Whether a normalized origin names the host (and port) of a `Host` header.
fn same_host(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
    let default = match scheme {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => "",
    };
    let host = match host.strip_suffix(default) {
        Some(bare) if !default.is_empty() => bare,
        _ => &host,
    };
    authority == host
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(policy: &OriginPolicy, origin: Option<&str>, host: &str) -> bool {
        policy.allows(origin.map(str::as_bytes), Some(host.as_bytes()))
    }

    #[test]
    fn same_host_by_default_and_no_origin_passes() {
        let p = OriginPolicy::default();
        assert!(allows(&p, None, "127.0.0.1:8080"), "not a browser");
        assert!(allows(&p, Some("http://127.0.0.1:8080"), "127.0.0.1:8080"));
        assert!(allows(&p, Some("HTTP://Example.COM"), "example.com:80"));
        assert!(allows(&p, Some("https://example.com:443/"), "EXAMPLE.com"));
        assert!(!allows(&p, Some("http://evil.example"), "127.0.0.1:8080"));
        assert!(
            !allows(&p, Some("http://127.0.0.1:9090"), "127.0.0.1:8080"),
            "port"
        );
        assert!(
            !allows(&p, Some("null"), "127.0.0.1:8080"),
            "a sandboxed page"
        );
        assert!(
            !allows(&p, Some("https://example.com"), "example.com:80"),
            "scheme's port"
        );
        assert!(!p.allows(Some(b"http://a"), None), "no Host");
    }

    #[test]
    fn lists_and_any() {
        let p = OriginPolicy::from_list(&["https://App.example.com/".into()]);
        assert!(allows(
            &p,
            Some("https://app.example.com"),
            "api.example.com"
        ));
        assert!(allows(
            &p,
            Some("https://app.example.com:443"),
            "api.example.com"
        ));
        assert!(
            allows(&p, Some("http://api.example.com"), "api.example.com"),
            "same host"
        );
        assert!(!allows(
            &p,
            Some("https://other.example.com"),
            "api.example.com"
        ));
        let any = OriginPolicy::from_list(&["*".into()]);
        assert_eq!(any, OriginPolicy::Any);
        assert!(allows(&any, Some("http://evil.example"), "x"));
        assert_eq!(OriginPolicy::from_list(&[]), OriginPolicy::SameHost);
    }
}
