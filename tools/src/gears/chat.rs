//! The chat gear: named users in rooms, with direct messages and room broadcasts,
//! spoken in JSON text frames.
//!
//! # Joining
//!
//! Connect to the gear's path with two query parameters:
//!
//! ```text
//! GET /chat?room=lobby&name=ann
//! ```
//!
//! - `name` is the user's name, unique among everyone connected to this gear (in every
//!   room). `room` is the room to join. Both are percent-decoded (`+` is a space), must
//!   be non-empty and at most 64 bytes long; `name` must not contain control
//!   characters.
//! - A missing, empty, too long or otherwise invalid parameter rejects the handshake
//!   with `400 Bad Request` and a plain-text body that says which parameter is wrong.
//! - A name someone connected already holds rejects the handshake with
//!   `409 Conflict` and the plain-text body `name "ann" is already taken in this chat`.
//!   The name becomes free again when its holder disconnects.
//! - If the name cannot be registered for another reason (the registry is unavailable
//!   or refuses the name), the handshake gets `503 Service Unavailable` with the
//!   plain-text body `cannot register name "ann": ` followed by the registry's reason.
//!
//! Nothing is sent on joining; in particular the room is not told.
//!
//! # Frames from the client
//!
//! Every client message is a JSON text frame:
//!
//! - `{"text":"hi all"}` (or `"to":null`) sends `text` to everyone in the sender's room,
//!   the sender included.
//! - `{"to":"bob","text":"hi bob"}` sends `text` to the user named `bob`, in whatever
//!   room he is. The sender does not get a copy.
//!
//! `text` must be a string and `to`, when present, a string or `null`; other fields
//! are ignored.
//!
//! # Frames to the client
//!
//! Messages arrive as JSON text frames, field order as shown:
//!
//! ```text
//! {"from":"ann","text":"hi all","to":null,"room":"lobby"}   a room message
//! {"from":"ann","text":"hi bob","to":"bob"}                 a direct message
//! ```
//!
//! # Errors
//!
//! A client message that cannot be carried out is answered, to the sender only, with a
//! JSON text frame holding an `error` string; the connection stays open. For
//! `{"text":5}`, an unknown recipient and a binary frame:
//!
//! ```text
//! {"error":"invalid message: invalid type: integer `5`, expected a string at line 1 column 9; expected {\"text\":\"...\"} or {\"to\":\"name\",\"text\":\"...\"}"}
//! {"error":"no user named \"bob\"","to":"bob"}
//! {"error":"binary frames are not supported; send JSON text"}
//! ```
//!
//! Besides these three, a message the registry could not queue (its queue towards
//! the recipient's shard was full, say) is answered with `{"error":"..."}` naming the
//! registry's reason, with `"to"` added for direct messages.

use std::borrow::Cow;
use std::sync::Arc;

use kythera_handler_api::{
    CloseCode, Conn, Context, Frame, Message, RegistryError, Response, Websocket,
};
use serde::{Deserialize, Serialize};

/// The longest `name` or `room` accepted, in bytes.
pub const MAX_PARAM_BYTES: usize = 64;

/// The chat gear: see the [module documentation](self) for the protocol.
#[derive(Debug, Clone, Copy, Default)]
pub struct Chat;

/// One connection's identity in the chat, fixed when it joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatState {
    name: Arc<str>,
    room: Arc<str>,
    group: Arc<str>,
}

impl ChatState {
    /// The user's name, unique in the gear.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The room the user is in.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// The registry group of the room: `room:` followed by the room's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    fn new(name: &str, room: &str) -> ChatState {
        ChatState {
            name: name.into(),
            room: room.into(),
            group: group_of(room).into(),
        }
    }
}

/// A chat message on its way to a connection: the JSON text frame it receives,
/// serialized once by the sender and shared (not copied) by every recipient.
///
/// Server code holding a connection handle can send its own events this way; the text
/// is forwarded as is, so it should be a JSON object in the format of the module
/// documentation.
///
/// Serializable, so that in a cluster it reaches users on other nodes (the server
/// mounts the gear with `mount_clustered`): the JSON text crosses as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatEvent(pub Arc<str>);

impl ChatEvent {
    /// The JSON text that is sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What `connect` hands to `init`.
struct Admitted {
    name: String,
    room: String,
}

/// A client frame, borrowing from the receive buffer where no unescaping is needed.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(default, borrow)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow)]
    text: Cow<'a, str>,
}

/// A message as recipients see it.
#[derive(Serialize)]
struct Outgoing<'a> {
    from: &'a str,
    text: &'a str,
    to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
}

/// An error frame for the sender.
#[derive(Serialize)]
struct ErrorFrame<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<&'a str>,
}

fn group_of(room: &str) -> String {
    format!("room:{room}")
}

fn to_json<T: Serialize>(value: &T) -> String {
    // The frames above hold only strings, which always serialize.
    serde_json::to_string(value)
        .unwrap_or_else(|_| r#"{"error":"internal error: could not encode a frame"}"#.to_owned())
}

fn send_error(ctx: &mut Context<'_, ChatEvent>, error: &str, to: Option<&str>) {
    ctx.send_text(&to_json(&ErrorFrame { error, to }));
}

/// A plain-text response for a rejected handshake.
fn plain(status: u16, body: String) -> Response {
    let response = Response::new(status).body(body);
    // A constant, valid header: this cannot fail.
    response
        .clone()
        .header("content-type", "text/plain; charset=utf-8")
        .unwrap_or(response)
}

/// Reads and checks one query parameter.
fn param(conn: &Conn, key: &str, allow_control: bool) -> Result<String, Response> {
    let value = conn.query_param(key).unwrap_or_default();
    if value.is_empty() {
        return Err(plain(
            400,
            format!("missing or empty query parameter \"{key}\""),
        ));
    }
    if value.len() > MAX_PARAM_BYTES {
        return Err(plain(
            400,
            format!("query parameter \"{key}\" is longer than {MAX_PARAM_BYTES} bytes"),
        ));
    }
    if !allow_control && value.chars().any(char::is_control) {
        return Err(plain(
            400,
            format!("query parameter \"{key}\" contains control characters"),
        ));
    }
    Ok(value)
}

impl Chat {
    /// Validates the query and registers the name: what `connect` does.
    fn admit(&self, conn: &mut Conn) -> Result<Admitted, Response> {
        let name = param(conn, "name", false)?;
        let room = param(conn, "room", true)?;
        match conn.register(&name) {
            Ok(()) => Ok(Admitted { name, room }),
            Err(RegistryError::Taken) => Err(plain(
                409,
                format!("name \"{name}\" is already taken in this chat"),
            )),
            Err(e) => Err(plain(503, format!("cannot register name \"{name}\": {e}"))),
        }
    }

    fn send_direct(
        &self,
        state: &ChatState,
        to: &str,
        text: &str,
        ctx: &mut Context<'_, ChatEvent>,
    ) {
        let json = to_json(&Outgoing {
            from: &state.name,
            text,
            to: Some(to),
            room: None,
        });
        match ctx.send_message(to, ChatEvent(json.into())) {
            Ok(true) => {}
            Ok(false) => send_error(ctx, &format!("no user named \"{to}\""), Some(to)),
            Err(e) => send_error(ctx, &e.to_string(), Some(to)),
        }
    }

    fn send_room(&self, state: &ChatState, text: &str, ctx: &mut Context<'_, ChatEvent>) {
        let json = to_json(&Outgoing {
            from: &state.name,
            text,
            to: None,
            room: Some(&state.room),
        });
        // A frame, not a typed message: encoded once for every member on this node,
        // with no callback per member, and, in a live handover, relayed to the members
        // the other process holds (a typed message could not be).
        if let Err(e) = ctx.publish_frame(&state.group, Frame::text(json)) {
            send_error(ctx, &e.to_string(), None);
        }
    }
}

impl Websocket for Chat {
    type State = ChatState;
    type Message = ChatEvent;

    fn connect(&self, conn: &mut Conn) -> Result<(), Response> {
        let admitted = self.admit(conn)?;
        conn.set_data(admitted);
        Ok(())
    }

    fn init(&self, conn: &mut Conn, ctx: &mut Context<'_, ChatEvent>) -> ChatState {
        // The engine always calls `connect` first; a harness that skips it gets the same
        // checks here, with a close instead of an HTTP rejection.
        let admitted = match conn.take_data::<Admitted>() {
            Some(a) => a,
            None => match self.admit(conn) {
                Ok(a) => a,
                Err(response) => {
                    let reason = String::from_utf8_lossy(response.body_bytes()).into_owned();
                    ctx.close_with(CloseCode::POLICY_VIOLATION, &reason);
                    return ChatState::new("", "");
                }
            },
        };
        let state = ChatState::new(&admitted.name, &admitted.room);
        if let Err(e) = ctx.join(&state.group) {
            tracing::warn!(
                conn = %ctx.id(),
                group = %state.group,
                error = %e,
                "chat: could not join the room; room messages will not arrive"
            );
        }
        state
    }

    fn handle_client_message(
        &self,
        state: &mut ChatState,
        msg: Message<'_>,
        ctx: &mut Context<'_, ChatEvent>,
    ) {
        let text = match msg {
            Message::Text(text) => text,
            Message::Binary(_) => {
                send_error(ctx, "binary frames are not supported; send JSON text", None);
                return;
            }
        };
        match serde_json::from_str::<Incoming<'_>>(text) {
            Ok(Incoming { to: Some(to), text }) => self.send_direct(state, &to, &text, ctx),
            Ok(Incoming { to: None, text }) => self.send_room(state, &text, ctx),
            Err(e) => send_error(
                ctx,
                &format!(
                    "invalid message: {e}; expected {{\"text\":\"...\"}} or \
                     {{\"to\":\"name\",\"text\":\"...\"}}"
                ),
                None,
            ),
        }
    }

    fn handle_server_message(
        &self,
        _state: &mut ChatState,
        event: ChatEvent,
        ctx: &mut Context<'_, ChatEvent>,
    ) {
        ctx.send_text(&event.0);
    }

    /// Handed over as `[1]` (the format) followed by JSON `[name, room]`; the engine
    /// moves the name and the room's membership with it.
    fn freeze(&self, state: &ChatState) -> Option<Vec<u8>> {
        let mut bytes = vec![1u8];
        serde_json::to_writer(&mut bytes, &(&*state.name, &*state.room)).ok()?;
        Some(bytes)
    }

    fn thaw(&self, frozen: &[u8]) -> Option<ChatState> {
        let (&format, json) = frozen.split_first()?;
        if format != 1 {
            return None;
        }
        let (name, room): (String, String) = serde_json::from_slice(json).ok()?;
        Some(ChatState::new(&name, &room))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kythera_handler_api::{
        ConnHandle, ConnId, NameTable, RecordingSink, RegistryOps, RequestParts,
    };
    use serde_json::Value;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// What the fake registry was asked to do, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Register(ConnId, String),
        Join(ConnId, String),
        SendMessage(String),
        Publish(String),
    }

    #[derive(Debug, Default)]
    struct Inner {
        names: HashMap<String, ConnId>,
        groups: HashMap<String, Vec<ConnId>>,
        inboxes: HashMap<ConnId, Vec<ChatEvent>>,
        calls: Vec<Call>,
    }

    /// An in-memory registry for several connections: a name table and the registry
    /// operations in one, delivering into per-connection inboxes.
    #[derive(Debug, Clone, Default)]
    struct FakeRegistry(Arc<Mutex<Inner>>);

    impl FakeRegistry {
        fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
            self.0.lock().unwrap()
        }

        fn take_inbox(&self, conn: ConnId) -> Vec<ChatEvent> {
            self.inner().inboxes.remove(&conn).unwrap_or_default()
        }

        fn calls(&self) -> Vec<Call> {
            self.inner().calls.clone()
        }
    }

    impl NameTable for FakeRegistry {
        fn register(&self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
            let mut inner = self.inner();
            inner.calls.push(Call::Register(conn, name.to_owned()));
            match inner.names.get(name) {
                Some(holder) if *holder != conn => Err(RegistryError::Taken),
                _ => {
                    inner.names.insert(name.to_owned(), conn);
                    Ok(())
                }
            }
        }

        fn unregister(&self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
            let mut inner = self.inner();
            match inner.names.get(name) {
                Some(holder) if *holder == conn => {
                    inner.names.remove(name);
                    Ok(())
                }
                _ => Err(RegistryError::NotRegistered),
            }
        }

        fn lookup(&self, name: &str) -> Option<ConnId> {
            self.inner().names.get(name).copied()
        }
    }

    impl RegistryOps<ChatEvent> for FakeRegistry {
        fn register(&mut self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
            NameTable::register(self, conn, name)
        }

        fn unregister(&mut self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
            NameTable::unregister(self, conn, name)
        }

        fn lookup(&mut self, name: &str) -> Result<Option<ConnId>, RegistryError> {
            Ok(NameTable::lookup(self, name))
        }

        fn send_message(&mut self, name: &str, msg: ChatEvent) -> Result<bool, RegistryError> {
            let mut inner = self.inner();
            inner.calls.push(Call::SendMessage(name.to_owned()));
            match inner.names.get(name).copied() {
                Some(conn) => {
                    inner.inboxes.entry(conn).or_default().push(msg);
                    Ok(true)
                }
                None => Ok(false),
            }
        }

        fn join(&mut self, conn: ConnId, group: &str) -> Result<(), RegistryError> {
            let mut inner = self.inner();
            inner.calls.push(Call::Join(conn, group.to_owned()));
            let members = inner.groups.entry(group.to_owned()).or_default();
            if !members.contains(&conn) {
                members.push(conn);
            }
            Ok(())
        }

        fn leave(&mut self, conn: ConnId, group: &str) -> Result<(), RegistryError> {
            let mut inner = self.inner();
            let members = inner
                .groups
                .get_mut(group)
                .ok_or(RegistryError::NotInGroup)?;
            let before = members.len();
            members.retain(|m| *m != conn);
            if members.len() == before {
                return Err(RegistryError::NotInGroup);
            }
            Ok(())
        }

        fn publish(&mut self, group: &str, msg: ChatEvent) -> Result<usize, RegistryError> {
            let mut inner = self.inner();
            inner.calls.push(Call::Publish(group.to_owned()));
            let members = inner.groups.get(group).cloned().unwrap_or_default();
            for conn in &members {
                inner.inboxes.entry(*conn).or_default().push(msg.clone());
            }
            Ok(members.len())
        }

        /// Delivered as the engine would: the frame's text, as if through
        /// `handle_server_message`.
        fn publish_frame(&mut self, group: &str, frame: Frame) -> Result<usize, RegistryError> {
            let Frame::Text(text) = frame else {
                return Err(RegistryError::Unavailable);
            };
            self.publish(group, ChatEvent(text.as_str().into()))
        }

        fn count(&mut self, group: &str) -> Result<usize, RegistryError> {
            Ok(self.inner().groups.get(group).map_or(0, Vec::len))
        }

        fn handle(&mut self, _: ConnId) -> Result<ConnHandle<ChatEvent>, RegistryError> {
            Err(RegistryError::Unavailable)
        }
    }

    /// One connected client: its state and everything sent to it.
    struct Client {
        id: ConnId,
        state: ChatState,
        sink: RecordingSink,
        closed: bool,
    }

    impl Client {
        /// The text frames received so far, parsed, emptying the sink.
        fn received(&mut self) -> Vec<Value> {
            std::mem::take(&mut self.sink.frames)
                .into_iter()
                .map(|f| match f {
                    Frame::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
                    other => panic!("expected a text frame, got {other:?}"),
                })
                .collect()
        }
    }

    struct Harness {
        gear: Chat,
        registry: FakeRegistry,
        next: u64,
    }

    impl Harness {
        fn new() -> Harness {
            Harness {
                gear: Chat,
                registry: FakeRegistry::default(),
                next: 1,
            }
        }

        /// Runs `connect` and, if it accepts, `init`.
        fn connect(&mut self, query: &str) -> Result<Client, Response> {
            let id = ConnId::new(0, self.next);
            self.next += 1;
            let req = RequestParts {
                query: query.into(),
                ..Default::default()
            };
            let mut conn = Conn::with_names(id, req, Arc::new(self.registry.clone()));
            self.gear.connect(&mut conn)?;
            let mut sink = RecordingSink::default();
            let mut registry = self.registry.clone();
            let mut ctx = Context::new(id, false, &mut sink, &mut registry);
            let state = self.gear.init(&mut conn, &mut ctx);
            let closed = ctx.is_closed();
            Ok(Client {
                id,
                state,
                sink,
                closed,
            })
        }

        fn join(&mut self, room: &str, name: &str) -> Client {
            self.connect(&format!("room={room}&name={name}"))
                .expect("accepted")
        }

        fn send(&self, client: &mut Client, msg: Message<'_>) {
            let mut registry = self.registry.clone();
            let mut ctx = Context::new(client.id, client.closed, &mut client.sink, &mut registry);
            self.gear
                .handle_client_message(&mut client.state, msg, &mut ctx);
            client.closed = ctx.is_closed();
        }

        fn send_text(&self, client: &mut Client, text: &str) {
            self.send(client, Message::Text(text));
        }

        /// Delivers every queued server message to the given clients.
        fn pump(&self, clients: &mut [&mut Client]) {
            for client in clients.iter_mut() {
                for event in self.registry.take_inbox(client.id) {
                    let mut registry = self.registry.clone();
                    let mut ctx =
                        Context::new(client.id, client.closed, &mut client.sink, &mut registry);
                    self.gear
                        .handle_server_message(&mut client.state, event, &mut ctx);
                    client.closed = ctx.is_closed();
                }
            }
        }
    }

    fn body(r: &Response) -> &str {
        std::str::from_utf8(r.body_bytes()).unwrap()
    }

    fn is_plain_text(r: &Response) -> bool {
        r.headers()
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.starts_with("text/plain"))
    }

    fn error_of(v: &Value) -> &str {
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {v}"))
    }

    #[test]
    fn joining_registers_the_name_and_joins_the_room() {
        let mut h = Harness::new();
        let ann = h.connect("room=the+lobby&name=ann%20b").unwrap();
        assert_eq!(ann.state.name(), "ann b");
        assert_eq!(ann.state.room(), "the lobby");
        assert_eq!(ann.state.group(), "room:the lobby");
        assert!(ann.sink.frames.is_empty(), "init sends nothing");
        assert!(!ann.closed);
        assert_eq!(
            h.registry.calls(),
            vec![
                Call::Register(ann.id, "ann b".into()),
                Call::Join(ann.id, "room:the lobby".into()),
            ]
        );
    }

    #[test]
    fn taken_name_is_409() {
        let mut h = Harness::new();
        let _ann = h.join("lobby", "ann");
        let r = h.connect("room=other&name=ann").err().expect("rejected");
        assert_eq!(r.status(), 409);
        assert!(is_plain_text(&r));
        assert_eq!(body(&r), "name \"ann\" is already taken in this chat");
        // The first holder keeps the name.
        let ann_id = ConnId::new(0, 1);
        assert_eq!(NameTable::lookup(&h.registry, "ann"), Some(ann_id));
    }

    #[test]
    fn bad_parameters_are_400() {
        let mut h = Harness::new();
        let long = "x".repeat(MAX_PARAM_BYTES + 1);
        let ok64 = "y".repeat(MAX_PARAM_BYTES);
        for (query, needle) in [
            ("room=lobby", "\"name\""),
            ("name=ann", "\"room\""),
            ("", "\"name\""),
            ("room=lobby&name=", "\"name\""),
            ("room=&name=ann", "\"room\""),
            (&format!("room=lobby&name={long}"), "longer than 64 bytes"),
            (&format!("room={long}&name=ann"), "\"room\" is longer"),
            ("room=lobby&name=a%0Ab", "control characters"),
            ("room=lobby&name=a%7Fb", "control characters"),
        ] {
            let r = h.connect(query).err().expect(query);
            assert_eq!(r.status(), 400, "{query}");
            assert!(is_plain_text(&r), "{query}");
            assert!(body(&r).contains(needle), "{query}: {}", body(&r));
        }
        assert!(
            h.registry.calls().is_empty(),
            "nothing registered for rejected requests"
        );
        h.connect(&format!("room={ok64}&name={ok64}"))
            .expect("64 bytes is fine");
    }

    #[test]
    fn registry_failure_is_503() {
        let gear = Chat;
        // No name table behind the request.
        let mut conn = Conn::new(
            ConnId::new(0, 1),
            RequestParts {
                query: "room=lobby&name=ann".into(),
                ..Default::default()
            },
        );
        let r = gear.connect(&mut conn).unwrap_err();
        assert_eq!(r.status(), 503);
        assert!(is_plain_text(&r));
        assert!(body(&r).contains("registry unavailable"), "{}", body(&r));
    }

    #[test]
    fn direct_message_reaches_only_the_target() {
        let mut h = Harness::new();
        let mut ann = h.join("lobby", "ann");
        let mut bob = h.join("kitchen", "bob");
        let mut cat = h.join("lobby", "cat");
        h.send_text(&mut ann, r#"{"to":"bob","text":"hi bob"}"#);
        h.pump(&mut [&mut ann, &mut bob, &mut cat]);
        assert!(ann.received().is_empty(), "the sender gets no copy");
        assert!(cat.received().is_empty());
        let got = bob.received();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0],
            serde_json::json!({"from": "ann", "text": "hi bob", "to": "bob"})
        );
        assert_eq!(
            bob.sink.frames.len(),
            0,
            "received() drained the frames it parsed"
        );
    }

    /// The README's protocol table (`| you send | who receives | what they receive |`)
    /// says exactly what the gear sends, byte for byte, for a room and a direct message.
    #[test]
    fn the_readme_table_is_what_the_gear_sends() {
        let readme = include_str!("../../../README.md");
        let row = |sent: &str| -> String {
            let line = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{sent}` |")))
                .unwrap_or_else(|| panic!("README has no row for {sent}"));
            let cell = line.trim_end_matches(" |").rsplit(" | ").next().unwrap();
            cell.trim_matches('`').to_owned()
        };
        let mut h = Harness::new();
        let mut n = h.join("R", "N");
        let mut n2 = h.join("elsewhere", "N2");
        h.send_text(&mut n, r#"{"text":"hi"}"#);
        h.pump(&mut [&mut n, &mut n2]);
        assert_eq!(n.sink.frames, vec![Frame::text(row(r#"{"text":"hi"}"#))]);
        assert!(n2.sink.frames.is_empty());
        n.sink.frames.clear();
        h.send_text(&mut n, r#"{"to":"N2","text":"hi"}"#);
        h.pump(&mut [&mut n, &mut n2]);
        assert!(n.sink.frames.is_empty(), "no copy for the sender");
        assert_eq!(
            n2.sink.frames,
            vec![Frame::text(row(r#"{"to":"N2","text":"hi"}"#))]
        );
    }

    #[test]
    fn direct_message_wire_format() {
        let mut h = Harness::new();
        let mut ann = h.join("lobby", "ann");
        let mut bob = h.join("lobby", "bob");
        h.send_text(&mut ann, r#"{"to":"bob","text":"x"}"#);
        h.pump(&mut [&mut bob]);
        assert_eq!(
            bob.sink.frames,
            vec![Frame::text(r#"{"from":"ann","text":"x","to":"bob"}"#)]
        );
    }

    #[test]
    fn unknown_recipient_is_an_error_frame_not_a_disconnect() {
        let mut h = Harness::new();
        let mut ann = h.join("lobby", "ann");
        h.send_text(&mut ann, r#"{"to":"nobody","text":"hello?"}"#);
        assert!(!ann.closed);
        let got = ann.received();
        assert_eq!(
            got,
            vec![serde_json::json!({"error": "no user named \"nobody\"", "to": "nobody"})]
        );
        // Still usable afterwards.
        h.send_text(&mut ann, r#"{"text":"still here"}"#);
        h.pump(&mut [&mut ann]);
        assert_eq!(ann.received()[0]["text"], "still here");
    }

    #[test]
    fn room_publish_reaches_every_member_and_only_them() {
        let mut h = Harness::new();
        let mut ann = h.join("lobby", "ann");
        let mut bob = h.join("lobby", "bob");
        let mut cat = h.join("lobby", "cat");
        let mut dan = h.join("kitchen", "dan");
        h.send_text(&mut bob, r#"{"text":"hello room"}"#);
        h.send_text(&mut dan, r#"{"to":null,"text":"kitchen only"}"#);
        assert!(
            h.registry
                .calls()
                .contains(&Call::Publish("room:lobby".into()))
        );
        h.pump(&mut [&mut ann, &mut bob, &mut cat, &mut dan]);
        let expected =
            serde_json::json!({"from": "bob", "text": "hello room", "to": null, "room": "lobby"});
        for client in [&mut ann, &mut bob, &mut cat] {
            assert_eq!(
                client.received(),
                vec![expected.clone()],
                "{}",
                client.state.name()
            );
        }
        assert_eq!(
            dan.sink.frames,
            vec![Frame::text(
                r#"{"from":"dan","text":"kitchen only","to":null,"room":"kitchen"}"#
            )]
        );
    }

    #[test]
    fn malformed_json_is_an_error_frame_and_the_connection_stays_open() {
        let mut h = Harness::new();
        let mut ann = h.join("lobby", "ann");
        let mut bob = h.join("lobby", "bob");
        for bad in [
            "not json",
            r#"{"text":5}"#,
            r#"{"to":"bob"}"#,
            r#"{"to":7,"text":"x"}"#,
            r#"["text"]"#,
            "",
            r#"{"text":"unterminated"#,
        ] {
            h.send_text(&mut ann, bad);
            assert!(!ann.closed, "{bad:?}");
            let got = ann.received();
            assert_eq!(got.len(), 1, "{bad:?}");
            assert!(
                error_of(&got[0]).starts_with("invalid message: "),
                "{bad:?}: {}",
                got[0]
            );
            assert_eq!(got[0].as_object().unwrap().len(), 1, "only `error`");
        }
        // The exact frame the module documentation shows.
        h.send_text(&mut ann, r#"{"text":5}"#);
        assert_eq!(
            ann.sink.frames,
            vec![Frame::text(
                r#"{"error":"invalid message: invalid type: integer `5`, expected a string at line 1 column 9; expected {\"text\":\"...\"} or {\"to\":\"name\",\"text\":\"...\"}"}"#
            )]
        );
        ann.sink.frames.clear();
        h.pump(&mut [&mut ann, &mut bob]);
        assert!(bob.received().is_empty(), "nothing was sent on");
        assert!(
            h.registry
                .calls()
                .iter()
                .all(|c| !matches!(c, Call::SendMessage(_) | Call::Publish(_)))
        );
        // Unknown fields are ignored.
        h.send_text(&mut ann, r#"{"text":"ok","extra":[1,2]}"#);
        h.pump(&mut [&mut bob]);
        assert_eq!(bob.received()[0]["text"], "ok");
    }

    #[test]
    fn binary_is_an_error_frame() {
        let mut h = Harness::new();
        let mut ann = h.join("lobby", "ann");
        h.send(&mut ann, Message::Binary(br#"{"text":"hi"}"#));
        assert!(!ann.closed);
        assert_eq!(
            ann.sink.frames,
            vec![Frame::text(
                r#"{"error":"binary frames are not supported; send JSON text"}"#
            )]
        );
        assert!(h.registry.take_inbox(ann.id).is_empty());
    }

    #[test]
    fn awkward_text_round_trips() {
        let mut h = Harness::new();
        let mut ann = h.join("lobby", "ann");
        let mut bob = h.join("lobby", "bob \"the\" b\u{e9}");
        let text = "she said \"hi\"\\\n\ttabs, \u{e9}t\u{e9}, \u{1f600}, </script>, \u{0}";
        let frame = serde_json::json!({"to": bob.state.name(), "text": text}).to_string();
        h.send_text(&mut ann, &frame);
        let room_frame = serde_json::json!({"text": text}).to_string();
        h.send_text(&mut bob, &room_frame);
        h.pump(&mut [&mut ann, &mut bob]);
        let to_bob = bob.received();
        assert_eq!(to_bob.len(), 2);
        assert_eq!(to_bob[0]["text"], text);
        assert_eq!(to_bob[0]["to"], "bob \"the\" b\u{e9}");
        assert_eq!(to_bob[1]["text"], text);
        assert_eq!(to_bob[1]["from"], "bob \"the\" b\u{e9}");
        let to_ann = ann.received();
        assert_eq!(to_ann.len(), 1);
        assert_eq!(to_ann[0]["text"], text);
        // Escapes in the recipient's name are unescaped before the lookup.
        h.send_text(&mut ann, r#"{"to":"bob \"the\" b\u00e9","text":"esc"}"#);
        h.pump(&mut [&mut bob]);
        assert_eq!(bob.received()[0]["text"], "esc");
    }

    #[test]
    fn server_message_is_sent_as_is() {
        let gear = Chat;
        let mut sink = RecordingSink::default();
        let mut registry = FakeRegistry::default();
        let mut ctx = Context::new(ConnId::new(0, 1), false, &mut sink, &mut registry);
        let mut state = ChatState::new("ann", "lobby");
        let event = ChatEvent(Arc::from(r#"{"from":"sys","text":"hi","to":null}"#));
        gear.handle_server_message(&mut state, event.clone(), &mut ctx);
        assert_eq!(sink.frames, vec![Frame::text(event.as_str().to_owned())]);
    }

    #[test]
    fn init_without_connect_checks_the_request() {
        let gear = Chat;
        let registry = FakeRegistry::default();
        let mut conn = Conn::with_names(
            ConnId::new(0, 1),
            RequestParts {
                query: "room=lobby".into(),
                ..Default::default()
            },
            Arc::new(registry.clone()),
        );
        let mut sink = RecordingSink::default();
        let mut reg = registry.clone();
        let mut ctx = Context::new(conn.id(), false, &mut sink, &mut reg);
        gear.init(&mut conn, &mut ctx);
        assert!(ctx.is_closed());
        assert!(matches!(
            &sink.frames[..],
            [Frame::Close(Some(c))] if c.code == CloseCode::POLICY_VIOLATION
        ));
    }
}
