//! The upgrade request as `connect` and `init` see it, and the response they shape.

use bytes::Bytes;
use std::any::Any;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::registry::{NameTable, RegistryError};

/// Identifies one connection for its whole life, unique within the engine.
///
/// The engine packs the shard index in the top 8 bits and a per-shard counter below,
/// so two connections never share an id, even after a slot is reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    /// Builds an id from the owning shard and a per-shard sequence number.
    pub const fn new(shard: u8, seq: u64) -> ConnId {
        ConnId(((shard as u64) << 56) | (seq & ((1 << 56) - 1)))
    }

    /// The shard that owns the connection ([`ConnId::REMOTE_SHARD`] for a connection
    /// on another node).
    pub const fn shard(self) -> u8 {
        (self.0 >> 56) as u8
    }

    /// The shard number of ids that stand for connections on other nodes of a cluster:
    /// the registry gives such a connection a local alias (the same one for all the
    /// names it holds, while this node knows of them), so that `lookup` can answer
    /// with an id and a [`ConnHandle`](crate::ConnHandle) can reach it. A server has at
    /// most 255 shards, so no local connection has this shard number.
    pub const REMOTE_SHARD: u8 = u8::MAX;

    /// Whether this id stands for a connection on another node of the cluster.
    pub const fn is_remote(self) -> bool {
        self.shard() == Self::REMOTE_SHARD
    }

    /// The raw value, for logs and maps.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnId({}:{})", self.shard(), self.0 & ((1 << 56) - 1))
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.shard(), self.0 & ((1 << 56) - 1))
    }
}

/// The parts of an upgrade request that the engine parsed, owned, to build a [`Conn`].
#[derive(Debug, Clone, Default)]
pub struct RequestParts {
    /// The HTTP method (always `GET` for an accepted upgrade).
    pub method: String,
    /// The path, without the query string, as sent (not percent-decoded).
    pub path: String,
    /// The raw query string after `?`, without the `?`.
    pub query: String,
    /// Values of the route's placeholders (`:room`) and wildcard (`*rest`), in order.
    pub path_params: Vec<(String, String)>,
    /// Headers in request order, names lower-cased; values as sent (lossy UTF-8).
    pub headers: Vec<(String, String)>,
    /// The peer's address.
    pub peer: Option<SocketAddr>,
    /// The TLS session the request came over (`wss://`), `None` on a plain listener.
    pub tls: Option<TlsParts>,
}

/// What the engine knows of a connection's TLS session, for `connect` and `init`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParts {
    /// The host name the client asked for in its TLS handshake (SNI), if it sent one.
    /// Compare it with the `Host` header to refuse a request sent to another name.
    pub server_name: Option<String>,
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: &'static str,
    /// The handshake resumed an earlier session (a ticket or a cached session id).
    pub resumed: bool,
}

/// The upgrade request and the response being prepared, as `connect` and `init` see it.
///
/// The engine keeps a `Conn` only until `init` returns: later callbacks get no request,
/// so that an idle connection costs a few dozen bytes rather than the size of its
/// headers. Copy what later callbacks need into the gear's state in `init`.
pub struct Conn {
    id: ConnId,
    req: RequestParts,
    data: Option<Box<dyn Any + Send>>,
    subprotocol: Option<String>,
    response_headers: Vec<(String, String)>,
    names: Option<Arc<dyn NameTable>>,
    registered: Vec<Box<str>>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("request", &self.req)
            .field("has_data", &self.data.is_some())
            .field("subprotocol", &self.subprotocol)
            .field("response_headers", &self.response_headers)
            .field("registered", &self.registered)
            .finish()
    }
}

impl Conn {
    /// Wraps a parsed request. Engines and test harnesses call this.
    pub fn new(id: ConnId, req: RequestParts) -> Conn {
        Conn {
            id,
            req,
            data: None,
            subprotocol: None,
            response_headers: Vec::new(),
            names: None,
            registered: Vec::new(),
        }
    }

    /// Wraps a parsed request and gives `connect` and `init` the gear's name table, so
    /// that [`Conn::register`] works before the handshake is answered. Engines and test
    /// harnesses call this.
    pub fn with_names(id: ConnId, req: RequestParts, names: Arc<dyn NameTable>) -> Conn {
        Conn {
            names: Some(names),
            ..Conn::new(id, req)
        }
    }

    /// Registers `name` for this connection in the gear's namespace, during `connect`
    /// or `init`: a gear can reject the handshake (409, say) when the name is taken,
    /// which `init` (after the 101) cannot. The name is held from now on; if the
    /// handshake fails after all, the engine gives it back.
    pub fn register(&mut self, name: &str) -> Result<(), RegistryError> {
        let names = self.names.as_ref().ok_or(RegistryError::Unavailable)?;
        names.register(self.id, name)?;
        if !self.registered.iter().any(|n| &**n == name) {
            self.registered.push(name.into());
        }
        Ok(())
    }

    /// Who holds `name` in the gear's namespace.
    pub fn lookup(&self, name: &str) -> Result<Option<ConnId>, RegistryError> {
        let names = self.names.as_ref().ok_or(RegistryError::Unavailable)?;
        Ok(names.lookup(name))
    }

    /// The names [`Conn::register`] took so far.
    pub fn registered(&self) -> &[Box<str>] {
        &self.registered
    }

    /// The names [`Conn::register`] took, for the engine's bookkeeping (it frees them
    /// when the connection ends). Empties the list.
    pub fn take_registered(&mut self) -> Vec<Box<str>> {
        std::mem::take(&mut self.registered)
    }

    /// This connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The HTTP method.
    pub fn method(&self) -> &str {
        &self.req.method
    }

    /// The request path, without the query string.
    pub fn path(&self) -> &str {
        &self.req.path
    }

    /// The raw query string (without `?`).
    pub fn raw_query(&self) -> &str {
        &self.req.query
    }

    /// The value of a route placeholder: for a gear mounted on `/rooms/:room`, a request
    /// to `/rooms/lobby` has `path_param("room") == Some("lobby")`.
    pub fn path_param(&self, name: &str) -> Option<&str> {
        self.req
            .path_params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// All route parameters, in route order.
    pub fn path_params(&self) -> &[(String, String)] {
        &self.req.path_params
    }

    /// The first value of a query parameter, percent-decoded (`+` is a space).
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.req.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// All query parameters, percent-decoded, in order.
    pub fn query_params(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.req.query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    /// The first value of a header; `name` is matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.req
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All headers, names lower-cased, in request order.
    pub fn headers(&self) -> &[(String, String)] {
        &self.req.headers
    }

    /// The value of a cookie from the `Cookie` header(s).
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// All cookies as `(name, value)`, in order.
    pub fn cookies(&self) -> impl Iterator<Item = (&str, &str)> {
        self.req
            .headers
            .iter()
            .filter(|(k, _)| k == "cookie")
            .flat_map(|(_, v)| v.split(';'))
            .filter_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                Some((k.trim(), v))
            })
    }

    /// The peer's address, when the engine knows it.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.req.peer
    }

    /// The TLS session the request came over, `None` on a plain (`ws://`) listener.
    pub fn tls(&self) -> Option<&TlsParts> {
        self.req.tls.as_ref()
    }

    /// Subprotocols the client offered in `Sec-WebSocket-Protocol`, in its order.
    pub fn offered_subprotocols(&self) -> impl Iterator<Item = &str> {
        self.req
            .headers
            .iter()
            .filter(|(k, _)| k == "sec-websocket-protocol")
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// Picks the subprotocol to answer with. It must be one the client offered
    /// (RFC 6455 section 4.2.2); otherwise nothing changes and the error says so.
    pub fn select_subprotocol(&mut self, name: &str) -> Result<(), NotOffered> {
        if self.offered_subprotocols().any(|p| p == name) {
            self.subprotocol = Some(name.to_owned());
            Ok(())
        } else {
            Err(NotOffered(name.to_owned()))
        }
    }

    /// The subprotocol chosen so far.
    pub fn subprotocol(&self) -> Option<&str> {
        self.subprotocol.as_deref()
    }

    /// Adds a header to the 101 response. Names must be HTTP tokens and values must
    /// not contain CR, LF or NUL; the headers the handshake owns (`Upgrade`,
    /// `Connection`, `Sec-WebSocket-*`) cannot be set here.
    pub fn add_response_header(&mut self, name: &str, value: &str) -> Result<(), InvalidHeader> {
        check_header(name, value)?;
        let lower = name.to_ascii_lowercase();
        if matches!(lower.as_str(), "upgrade" | "connection" | "content-length")
            || lower.starts_with("sec-websocket-")
        {
            return Err(InvalidHeader::Reserved(name.to_owned()));
        }
        self.response_headers
            .push((name.to_owned(), value.to_owned()));
        Ok(())
    }

    /// Headers added for the 101 response.
    pub fn response_headers(&self) -> &[(String, String)] {
        &self.response_headers
    }

    /// Attaches data for `init` (replacing what was there).
    pub fn set_data<T: Any + Send>(&mut self, data: T) {
        self.data = Some(Box::new(data));
    }

    /// The attached data, if it is a `T`.
    pub fn data<T: Any + Send>(&self) -> Option<&T> {
        self.data.as_ref()?.downcast_ref()
    }

    /// Takes the attached data out, if it is a `T`.
    pub fn take_data<T: Any + Send>(&mut self) -> Option<T> {
        match self.data.take()?.downcast::<T>() {
            Ok(b) => Some(*b),
            Err(other) => {
                self.data = Some(other);
                None
            }
        }
    }
}

/// The subprotocol chosen was not among those the client offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotOffered(pub String);

impl fmt::Display for NotOffered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "subprotocol {:?} was not offered by the client", self.0)
    }
}

impl std::error::Error for NotOffered {}

/// A response header that cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidHeader {
    /// The name is not an HTTP token.
    Name(String),
    /// The value holds CR, LF or NUL.
    Value(String),
    /// The handshake sets this header itself.
    Reserved(String),
}

impl fmt::Display for InvalidHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidHeader::Name(n) => write!(f, "invalid header name {n:?}"),
            InvalidHeader::Value(n) => write!(f, "invalid value for header {n:?}"),
            InvalidHeader::Reserved(n) => write!(f, "header {n:?} is set by the handshake"),
        }
    }
}

impl std::error::Error for InvalidHeader {}

/// Checks that a header can be written without breaking the response.
pub fn check_header(name: &str, value: &str) -> Result<(), InvalidHeader> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(InvalidHeader::Name(name.to_owned()));
    }
    if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(InvalidHeader::Value(name.to_owned()));
    }
    Ok(())
}

/// An ordinary HTTP response with which `connect` rejects an upgrade.
///
/// ```
/// use kythera_handler_api::Response;
/// let r = Response::new(403).header("x-why", "banned").unwrap().body("go away");
/// assert_eq!(r.status(), 403);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Response {
    /// A response with this status (clamped to 100..=599), no headers and an empty body.
    pub fn new(status: u16) -> Response {
        Response {
            status: status.clamp(100, 599),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// Adds a header; `Content-Length` and `Connection` are written by the engine.
    pub fn header(mut self, name: &str, value: &str) -> Result<Response, InvalidHeader> {
        check_header(name, value)?;
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("connection") {
            return Err(InvalidHeader::Reserved(name.to_owned()));
        }
        self.headers.push((name.to_owned(), value.to_owned()));
        Ok(self)
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Response {
        self.body = body.into();
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The headers.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body.
    pub fn body_bytes(&self) -> &Bytes {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(headers: &[(&str, &str)], query: &str) -> Conn {
        Conn::new(
            ConnId::new(1, 7),
            RequestParts {
                method: "GET".into(),
                path: "/chat".into(),
                query: query.into(),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn request_accessors() {
        let c = conn(
            &[
                ("cookie", "a=1; b=\"two\""),
                ("cookie", "c=3"),
                ("sec-websocket-protocol", "v1.chat, v2.chat"),
                ("x-thing", "yes"),
            ],
            "room=the%20lobby&name=al+ice",
        );
        assert_eq!(c.query_param("room").as_deref(), Some("the lobby"));
        assert_eq!(c.query_param("name").as_deref(), Some("al ice"));
        assert_eq!(c.cookie("b"), Some("two"));
        assert_eq!(c.cookie("c"), Some("3"));
        assert_eq!(c.header("X-Thing"), Some("yes"));
        assert_eq!(c.id().shard(), 1);
        let offered: Vec<_> = c.offered_subprotocols().collect();
        assert_eq!(offered, ["v1.chat", "v2.chat"]);
    }

    #[test]
    fn subprotocol_must_be_offered() {
        let mut c = conn(&[("sec-websocket-protocol", "a, b")], "");
        assert!(c.select_subprotocol("c").is_err());
        assert_eq!(c.subprotocol(), None);
        c.select_subprotocol("b").unwrap();
        assert_eq!(c.subprotocol(), Some("b"));
    }

    #[test]
    fn headers_are_checked() {
        let mut c = conn(&[], "");
        assert!(c.add_response_header("x-ok", "fine").is_ok());
        assert!(matches!(
            c.add_response_header("x-bad", "a\r\nInjected: 1"),
            Err(InvalidHeader::Value(_))
        ));
        assert!(matches!(
            c.add_response_header("bad name", "v"),
            Err(InvalidHeader::Name(_))
        ));
        assert!(matches!(
            c.add_response_header("Sec-WebSocket-Accept", "v"),
            Err(InvalidHeader::Reserved(_))
        ));
    }

    #[test]
    fn data_round_trip() {
        let mut c = conn(&[], "");
        c.set_data(42u32);
        assert_eq!(c.data::<String>(), None);
        assert_eq!(c.take_data::<String>(), None);
        assert_eq!(c.take_data::<u32>(), Some(42));
        assert_eq!(c.take_data::<u32>(), None);
    }
}
