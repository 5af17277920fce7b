//! The echo gear: every message goes back as it came, text as text and binary as
//! binary. It sends nothing unsolicited and keeps no state, which makes it the
//! reference gear for conformance runs (Autobahn) and load tests. [`PrefixEcho`] puts
//! a text before every text it sends back, so that a handover test can tell which
//! build answered.

use std::sync::Arc;

use kythera_handler_api::{Conn, Context, Message, Websocket};

/// The frozen state of both echo gears (they keep none): the format byte, so that a
/// later build can tell.
const FROZEN: &[u8] = &[1];

/// Sends every client message back to its sender, with the same type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

impl Websocket for Echo {
    type State = ();
    type Message = ();

    fn init(&self, _conn: &mut Conn, _ctx: &mut Context<'_, ()>) {}

    fn handle_client_message(&self, _state: &mut (), msg: Message<'_>, ctx: &mut Context<'_, ()>) {
        match msg {
            Message::Text(text) => ctx.send_text(text),
            Message::Binary(data) => ctx.send_binary(data),
        }
    }

    fn handle_server_message(&self, _state: &mut (), _msg: (), _ctx: &mut Context<'_, ()>) {}

    fn freeze(&self, _state: &()) -> Option<Vec<u8>> {
        Some(FROZEN.to_vec())
    }

    fn thaw(&self, frozen: &[u8]) -> Option<()> {
        (frozen == FROZEN).then_some(())
    }
}

/// The echo gear with `prefix` before every text message it sends back (binary goes
/// back as it came).
#[derive(Debug, Clone)]
pub struct PrefixEcho {
    /// What goes before each text.
    pub prefix: Arc<str>,
}

impl Websocket for PrefixEcho {
    type State = ();
    type Message = ();

    fn init(&self, _conn: &mut Conn, _ctx: &mut Context<'_, ()>) {}

    fn handle_client_message(&self, _state: &mut (), msg: Message<'_>, ctx: &mut Context<'_, ()>) {
        match msg {
            Message::Text(text) => ctx.send_text(&format!("{}{text}", self.prefix)),
            Message::Binary(data) => ctx.send_binary(data),
        }
    }

    fn handle_server_message(&self, _state: &mut (), _msg: (), _ctx: &mut Context<'_, ()>) {}

    fn freeze(&self, _state: &()) -> Option<Vec<u8>> {
        Some(FROZEN.to_vec())
    }

    fn thaw(&self, frozen: &[u8]) -> Option<()> {
        (frozen == FROZEN).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kythera_handler_api::{ConnId, Frame, NoRegistry, RecordingSink, RequestParts};

    #[test]
    fn echoes_text_as_text_and_binary_as_binary() {
        let gear = Echo;
        let mut conn = Conn::new(ConnId::new(0, 1), RequestParts::default());
        let (mut sink, mut registry) = (RecordingSink::default(), NoRegistry);
        let mut ctx = Context::new(conn.id(), false, &mut sink, &mut registry);
        gear.init(&mut conn, &mut ctx);
        assert!(sink.frames.is_empty(), "nothing unsolicited");
        let mut ctx = Context::new(conn.id(), false, &mut sink, &mut registry);
        gear.handle_client_message(&mut (), Message::Text("héllo"), &mut ctx);
        gear.handle_client_message(&mut (), Message::Binary(&[0, 1, 255]), &mut ctx);
        gear.handle_client_message(&mut (), Message::Text(""), &mut ctx);
        assert_eq!(
            sink.frames,
            vec![
                Frame::text("héllo"),
                Frame::binary(vec![0u8, 1, 255]),
                Frame::text(""),
            ]
        );
    }
}
