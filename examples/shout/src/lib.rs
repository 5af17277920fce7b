//! `Shout`, a complete small gear: every client joins one group; a text message is
//! shouted to every member as `"<nick>: <text>"`; `/nick NAME` changes the nickname
//! (unique per gear, through the registry); `/whisper NAME TEXT` reaches one member.
//!
//! It depends on `kythera-handler-api` only. Its tests (`tests/shout.rs`) run it in a real
//! engine through `testkit`; `examples/serve.rs` mounts it:
//! `cargo run --release -p shout --example serve`.
#![deny(missing_docs)]

use std::sync::Arc;

use kythera_handler_api::{Conn, Context, Message, Response, Websocket};

/// The group every connection joins.
pub const GROUP: &str = "everyone";

/// The gear.
#[derive(Debug, Default, Clone, Copy)]
pub struct Shout;

/// Per connection: the nickname.
#[derive(Debug)]
pub struct State {
    nick: String,
}

impl Websocket for Shout {
    type State = State;
    /// A line to show, shared by every member it is published to.
    type Message = Arc<str>;

    fn connect(&self, conn: &mut Conn) -> Result<(), Response> {
        if let Some(nick) = conn.query_param("nick")
            && conn.register(&nick).is_err()
        {
            return Err(Response::new(409).body(format!("nick {nick} is taken")));
        }
        Ok(())
    }

    fn init(&self, conn: &mut Conn, ctx: &mut Context<'_, Arc<str>>) -> State {
        let nick = conn
            .query_param("nick")
            .unwrap_or_else(|| format!("guest-{}", ctx.id()));
        if ctx.join(GROUP).is_err() {
            ctx.close_with_code(1011, "registry unavailable");
        }
        ctx.send_text(&format!("welcome, {nick}"));
        State { nick }
    }

    fn handle_client_message(
        &self,
        state: &mut State,
        msg: Message<'_>,
        ctx: &mut Context<'_, Arc<str>>,
    ) {
        let Message::Text(text) = msg else {
            ctx.send_text("text only, please");
            return;
        };
        if let Some(nick) = text.strip_prefix("/nick ") {
            match ctx.register(nick) {
                Ok(()) => {
                    let _ = ctx.unregister(&state.nick);
                    state.nick = nick.to_owned();
                    ctx.send_text(&format!("you are {nick}"));
                }
                Err(e) => ctx.send_text(&format!("cannot be {nick}: {e}")),
            }
        } else if let Some(rest) = text.strip_prefix("/whisper ") {
            let (to, line) = rest.split_once(' ').unwrap_or((rest, ""));
            let line: Arc<str> = format!("{} whispers: {line}", state.nick).into();
            if ctx.send_message(to, line) != Ok(true) {
                ctx.send_text(&format!("nobody is called {to}"));
            }
        } else {
            let line: Arc<str> = format!("{}: {text}", state.nick).into();
            let _ = ctx.publish(GROUP, line);
        }
    }

    fn handle_server_message(
        &self,
        _state: &mut State,
        line: Arc<str>,
        ctx: &mut Context<'_, Arc<str>>,
    ) {
        ctx.send_text(&line);
    }
}
