//! The echo gear that tests of the engine itself mount (metrics, smoke and binary
//! tests), so that each does not write its own.

use kythera_handler_api::{Conn, Context, Message, Response, Websocket};

/// Text back as text, binary back as binary; the text `bye` closes with 4000 "bye",
/// and an upgrade whose query has `reject` gets 403 "rejected" from `connect`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

impl Websocket for Echo {
    type State = ();
    type Message = ();

    fn connect(&self, conn: &mut Conn) -> Result<(), Response> {
        if conn.query_param("reject").is_some() {
            return Err(Response::new(403).body("rejected"));
        }
        Ok(())
    }

    fn init(&self, _: &mut Conn, _: &mut Context<'_, ()>) {}

    fn handle_client_message(&self, _: &mut (), msg: Message<'_>, ctx: &mut Context<'_, ()>) {
        match msg {
            Message::Text("bye") => ctx.close_with_code(4000, "bye"),
            Message::Text(t) => ctx.send_text(t),
            Message::Binary(b) => ctx.send_binary(b),
        }
    }

    fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}
}
