//! The registry through the real engine: two shards, real sockets, tokio-tungstenite
//! clients. Covered: 40 chat clients messaging each other by name and by room (every
//! message exactly once, in order per sender); a foreign thread sending to a name and
//! publishing; connection handles (delivery, then `Closed`); `publish_frame` (data and
//! close); every terminate reason freeing names and memberships; 409 for a taken name;
//! two gears that cannot reach each other's names or groups.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kythera_engine::config::Limits;
use kythera_handler_api::{
    Conn, ConnHandle, Context, Frame, Message, Response, TerminateError, TerminateReason, Websocket,
};
use kythera_registry::RegistryHandle;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tools::gears::chat::{Chat, ChatEvent};

const WAIT: Duration = Duration::from_secs(20);

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Log = Arc<Mutex<Vec<(String, TerminateReason)>>>;
type Handles = Arc<Mutex<Vec<ConnHandle<String>>>>;

/// A gear that exercises the registry:
///
/// - `connect` registers the `name` query parameter (409 if taken), `init` joins
///   group `all` and, with `?late=N`, registers `N` too;
/// - client text `to:N:T` sends `T` to `N` and answers `sent` or `nobody`;
///   `pub:T` publishes `T` to `all` and answers `pub:<count>`; `frame:T` publishes a
///   text frame; `closeall` publishes a close frame; `handle` hands out a connection
///   handle; `close` closes; `panic` panics;
/// - server messages are sent to the client as text;
/// - `terminate` records the name and the reason.
struct Reg {
    log: Log,
    handles: Handles,
}

struct RegState {
    name: String,
}

impl Websocket for Reg {
    type State = RegState;
    type Message = String;

    fn connect(&self, conn: &mut Conn) -> Result<(), Response> {
        let name = conn.query_param("name").unwrap_or_default();
        match conn.register(&name) {
            Ok(()) => Ok(()),
            Err(e) => Err(Response::new(409).body(format!("{name}: {e}"))),
        }
    }

    fn init(&self, conn: &mut Conn, ctx: &mut Context<'_, String>) -> RegState {
        ctx.join("all").expect("join");
        if let Some(late) = conn.query_param("late") {
            ctx.register(&late).expect("register in init");
        }
        RegState {
            name: conn.query_param("name").unwrap_or_default(),
        }
    }

    fn handle_client_message(
        &self,
        _: &mut RegState,
        msg: Message<'_>,
        ctx: &mut Context<'_, String>,
    ) {
        let Message::Text(text) = msg else { return };
        if let Some(rest) = text.strip_prefix("to:") {
            let (to, body) = rest.split_once(':').expect("to:N:T");
            let answer = match ctx.send_message(to, body.to_owned()) {
                Ok(true) => "sent".to_owned(),
                Ok(false) => "nobody".to_owned(),
                Err(e) => format!("error:{e}"),
            };
            ctx.send_text(&answer);
        } else if let Some(body) = text.strip_prefix("pub:") {
            let n = ctx.publish("all", body.to_owned()).expect("publish");
            ctx.send_text(&format!("pub:{n}"));
        } else if let Some(body) = text.strip_prefix("frame:") {
            let n = ctx
                .publish_frame("all", Frame::text(body.to_owned()))
                .expect("publish_frame");
            ctx.send_text(&format!("frame:{n}"));
        } else if text == "closeall" {
            ctx.publish_frame(
                "all",
                Frame::close(kythera_handler_api::CloseCode::new(4001).unwrap(), "all"),
            )
            .expect("publish close");
        } else if text == "handle" {
            self.handles
                .lock()
                .unwrap()
                .push(ctx.handle().expect("handle"));
            ctx.send_text("handle");
        } else if text == "close" {
            ctx.close();
        } else if text == "panic" {
            panic!("asked to");
        }
    }

    fn handle_server_message(&self, _: &mut RegState, msg: String, ctx: &mut Context<'_, String>) {
        ctx.send_text(&msg);
    }

    fn terminate(&self, state: RegState, reason: &TerminateReason, _: &mut Context<'_, String>) {
        self.log.lock().unwrap().push((state.name, reason.clone()));
    }
}

struct TestServer {
    server: Option<kythera_engine::RunningServer>,
    log: Log,
    handles: Handles,
}

impl TestServer {
    fn start(limits: Limits) -> TestServer {
        let log = Log::default();
        let handles = Handles::default();
        let server = kythera_engine::Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .shards(2)
            .limits(limits)
            .mount(
                "/a",
                Reg {
                    log: Arc::clone(&log),
                    handles: Arc::clone(&handles),
                },
            )
            .mount(
                "/b",
                Reg {
                    log: Arc::clone(&log),
                    handles: Arc::clone(&handles),
                },
            )
            .mount("/chat", Chat)
            .build()
            .expect("build")
            .spawn();
        TestServer {
            server: Some(server),
            log,
            handles,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().addr()
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr())
    }

    fn registry<M: Clone + Send + 'static>(&self, gear: &str) -> RegistryHandle<M> {
        self.server
            .as_ref()
            .unwrap()
            .handle()
            .registry::<M>(gear)
            .expect("the gear's registry")
    }

    fn stats(&self) -> Vec<kythera_engine::shard::ShardCounters> {
        self.server.as_ref().unwrap().handle().stats()
    }

    async fn wait_terminated(&self, name: &str) -> TerminateReason {
        let start = Instant::now();
        loop {
            if let Some((_, r)) = self.log.lock().unwrap().iter().find(|(n, _)| n == name) {
                return r.clone();
            }
            assert!(start.elapsed() < WAIT, "{name} never terminated");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn stop(mut self) {
        self.server.take().unwrap().stop().expect("clean stop");
    }
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn connect(url: &str) -> Client {
    within(url, tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .0
}

async fn next_text(ws: &mut Client) -> String {
    loop {
        match within("a text frame", ws.next()).await {
            Some(Ok(WsMessage::Text(t))) => return t.to_string(),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

async fn say(ws: &mut Client, text: &str) {
    within("send", ws.send(WsMessage::text(text)))
        .await
        .expect("send");
}

/// Polls until `cond` holds (the engine frees names on its own thread).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn forty_chat_clients_by_name_and_room_exactly_once_in_order() {
    let server = TestServer::start(Limits::default());
    const N: usize = 40;
    const K: usize = 25;
    let mut clients = Vec::new();
    for i in 0..N {
        let room = i % 2;
        clients.push(connect(&server.url(&format!("/chat?room=r{room}&name=u{i}"))).await);
    }
    let per_shard: Vec<u64> = server.stats().iter().map(|s| s.accepted).collect();
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "both shards serve: {per_shard:?}"
    );
    assert_eq!(
        server.registry::<ChatEvent>("/chat").count("room:r0"),
        N / 2
    );

    // Every client sends K messages to the next client by name and K to its room.
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            tokio::spawn(async move {
                for k in 0..K {
                    let to = format!("u{}", (i + 1) % N);
                    let direct = serde_json::json!({"to": to, "text": format!("d{k}")});
                    say(&mut ws, &direct.to_string()).await;
                    let room = serde_json::json!({"text": format!("r{k}")});
                    say(&mut ws, &room.to_string()).await;
                }
                // Direct messages from the previous client, room messages from each of
                // the N/2 members (itself included): K each.
                let expected = K + (N / 2) * K;
                let mut next: HashMap<(String, bool), usize> = HashMap::new();
                for _ in 0..expected {
                    let v: serde_json::Value =
                        serde_json::from_str(&next_text(&mut ws).await).expect("json");
                    assert!(v.get("error").is_none(), "client {i}: {v}");
                    let from = v["from"].as_str().unwrap().to_owned();
                    let text = v["text"].as_str().unwrap();
                    let direct = !v["to"].is_null();
                    if direct {
                        assert_eq!(v["to"], format!("u{i}"));
                        assert_eq!(from, format!("u{}", (i + N - 1) % N));
                    } else {
                        let sender: usize = from[1..].parse().unwrap();
                        assert_eq!(sender % 2, i % 2, "a room message from another room");
                    }
                    let seq = next.entry((from.clone(), direct)).or_default();
                    let want = format!("{}{}", if direct { "d" } else { "r" }, *seq);
                    assert_eq!(
                        text, want,
                        "client {i}: from {from} out of order or doubled"
                    );
                    *seq += 1;
                }
                assert!(next.values().all(|&n| n == K), "client {i}: {next:?}");
                // Nothing more arrives: no duplicates.
                let extra = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
                assert!(extra.is_err(), "client {i}: unexpected {extra:?}");
                ws.close(None).await.ok();
            })
        })
        .collect();
    for t in tasks {
        within("a client's exchange", t).await.expect("client task");
    }
    let stats = server.registry::<ChatEvent>("/chat").stats();
    assert_eq!(stats.dropped_full, 0);
    assert!(stats.forwarded > 0, "messages crossed shards: {stats:?}");
    let shards = server.stats();
    assert!(
        shards.iter().map(|s| s.wakeups_sent).sum::<u64>() > 0
            && shards.iter().map(|s| s.wakeups_received).sum::<u64>() > 0,
        "sleeping shards were woken with MSG_RING: {shards:?}"
    );
    eventually("names freed", || {
        server.registry::<ChatEvent>("/chat").stats().names == 0
    })
    .await;
    server.stop();
}

#[tokio::test]
async fn chat_rejects_a_taken_name_with_409() {
    let server = TestServer::start(Limits::default());
    let _ann = connect(&server.url("/chat?room=x&name=ann")).await;
    let err = tokio_tungstenite::connect_async(server.url("/chat?room=y&name=ann"))
        .await
        .expect_err("taken");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 409);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
            assert!(body.contains("ann") && body.contains("taken"), "{body}");
        }
        other => panic!("expected 409, got {other}"),
    }
    server.stop();
}

#[tokio::test]
async fn foreign_thread_sends_to_a_name_and_publishes() {
    let server = TestServer::start(Limits::default());
    let mut ann = connect(&server.url("/a?name=ann")).await;
    let mut bob = connect(&server.url("/a?name=bob")).await;
    let handle = server.registry::<String>("/a");
    let sent = std::thread::spawn(move || {
        let direct = handle.send_message("ann", "from a thread".to_owned());
        let nobody = handle.send_message("zed", "lost".to_owned());
        let published = handle.publish("all", "to everyone".to_owned());
        (direct, nobody, published)
    })
    .join()
    .unwrap();
    assert_eq!(sent, (Ok(true), Ok(false), Ok(2)));
    assert_eq!(next_text(&mut ann).await, "from a thread");
    assert_eq!(next_text(&mut ann).await, "to everyone");
    assert_eq!(next_text(&mut bob).await, "to everyone");
    // One envelope for the direct message, one per shard with members for the publish.
    let stats = server.stats();
    assert!(
        stats.iter().map(|s| s.registry_in).sum::<u64>() >= 2,
        "{stats:?}"
    );
    assert!(server.registry::<String>("/a").stats().from_foreign >= 2);
    server.stop();
}

#[tokio::test]
async fn a_sleeping_shard_is_woken_by_a_foreign_thread() {
    let server = TestServer::start(Limits::default());
    let mut ann = connect(&server.url("/a?name=ann")).await;
    let handle = server.registry::<String>("/a");
    let woken = || {
        server
            .stats()
            .iter()
            .map(|s| s.wakeups_received)
            .sum::<u64>()
    };
    // Let the shards go to sleep, then send; a shard that happened to be awake (a timer
    // tick) does not need waking, so try a few times.
    let mut tries = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = woken();
        let h = handle.clone();
        std::thread::spawn(move || h.send_message("ann", "wake up".to_owned()))
            .join()
            .unwrap()
            .expect("queued");
        assert_eq!(next_text(&mut ann).await, "wake up");
        if woken() > before {
            break;
        }
        tries += 1;
        assert!(
            tries < 5,
            "no eventfd wake-up in 5 tries: {:?}",
            server.stats()
        );
    }
    server.stop();
}

#[tokio::test]
async fn connection_handle_delivers_then_answers_closed() {
    let server = TestServer::start(Limits::default());
    let mut ann = connect(&server.url("/a?name=ann")).await;
    say(&mut ann, "handle").await;
    assert_eq!(next_text(&mut ann).await, "handle");
    let h = server.handles.lock().unwrap().pop().expect("a handle");
    let h2 = h.clone();
    std::thread::spawn(move || h2.send("via handle".to_owned()).expect("deliver"))
        .join()
        .unwrap();
    assert_eq!(next_text(&mut ann).await, "via handle");
    ann.close(None).await.ok();
    server.wait_terminated("ann").await;
    assert!(matches!(
        h.send("late".to_owned()),
        Err(kythera_handler_api::DeliverError::Closed(_))
    ));
    server.stop();
}

#[tokio::test]
async fn publish_frame_reaches_every_member_without_the_handler() {
    let server = TestServer::start(Limits::default());
    let mut members = Vec::new();
    for i in 0..6 {
        members.push(connect(&server.url(&format!("/a?name=m{i}"))).await);
    }
    say(&mut members[0], "frame:breaking news").await;
    assert_eq!(next_text(&mut members[0]).await, "frame:6");
    for ws in &mut members {
        assert_eq!(next_text(ws).await, "breaking news");
    }
    say(&mut members[1], "closeall").await;
    for ws in &mut members {
        match within("close", ws.next()).await {
            Some(Ok(WsMessage::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 4001);
                assert_eq!(f.reason.as_str(), "all");
            }
            other => panic!("expected the published close, got {other:?}"),
        }
    }
    for i in 0..6 {
        assert_eq!(
            server.wait_terminated(&format!("m{i}")).await,
            TerminateReason::Stop
        );
    }
    server.stop();
}

#[tokio::test]
async fn every_terminate_reason_frees_names_and_memberships() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(600),
        max_message_bytes: 1000,
        ..Limits::default()
    };
    let server = TestServer::start(limits);
    let reg = server.registry::<String>("/a");

    // Client close.
    let mut c = connect(&server.url("/a?name=closer&late=closer2")).await;
    assert_eq!(reg.count("all"), 1);
    assert!(reg.lookup("closer2").is_some(), "registered in init");
    c.close(None).await.ok();
    let r = server.wait_terminated("closer").await;
    assert!(matches!(r, TerminateReason::RemoteClose { .. }), "{r:?}");

    // TCP gone without a close frame.
    let c = connect(&server.url("/a?name=dropper")).await;
    drop(c);
    assert_eq!(
        server.wait_terminated("dropper").await,
        TerminateReason::Remote
    );

    // The gear closes.
    let mut c = connect(&server.url("/a?name=stopper")).await;
    say(&mut c, "close").await;
    assert_eq!(
        server.wait_terminated("stopper").await,
        TerminateReason::Stop
    );

    // A panic in the handler.
    let mut c = connect(&server.url("/a?name=panicker")).await;
    say(&mut c, "panic").await;
    let r = server.wait_terminated("panicker").await;
    assert!(
        matches!(r, TerminateReason::Error(TerminateError::HandlerPanic(_))),
        "{r:?}"
    );

    // A message over the limit.
    let mut c = connect(&server.url("/a?name=big")).await;
    c.send(WsMessage::binary(vec![0u8; 5000])).await.ok();
    let r = server.wait_terminated("big").await;
    assert!(matches!(r, TerminateReason::Error(_)), "{r:?}");

    // Idle timeout.
    let _idle = connect(&server.url("/a?name=idler")).await;
    assert_eq!(
        server.wait_terminated("idler").await,
        TerminateReason::Timeout
    );

    for name in [
        "closer", "closer2", "dropper", "stopper", "panicker", "big", "idler",
    ] {
        assert_eq!(reg.lookup(name), None, "{name} still registered");
    }
    assert_eq!(reg.count("all"), 0);
    assert_eq!(reg.stats().groups, 0);
    // The names are free again at once.
    let _again = connect(&server.url("/a?name=closer")).await;

    // The drain: names go with the connections.
    let _last = connect(&server.url("/a?name=drained")).await;
    assert!(reg.lookup("drained").is_some());
    server.stop();
    assert_eq!(reg.lookup("drained"), None);
    assert_eq!(reg.lookup("closer"), None);
    assert_eq!(reg.stats().names, 0);
}

#[tokio::test]
async fn gears_cannot_reach_each_others_names_or_groups() {
    let server = TestServer::start(Limits::default());
    let mut a_x = connect(&server.url("/a?name=x")).await;
    let mut b_x = connect(&server.url("/b?name=x")).await;
    let mut a_y = connect(&server.url("/a?name=y")).await;
    say(&mut a_y, "to:x:hello").await;
    assert_eq!(next_text(&mut a_y).await, "sent");
    assert_eq!(next_text(&mut a_x).await, "hello");
    let mut b_z = connect(&server.url("/b?name=z")).await;
    say(&mut b_z, "to:y:psst").await;
    assert_eq!(next_text(&mut b_z).await, "nobody", "y lives in gear /a");
    say(&mut b_z, "pub:b only").await;
    assert_eq!(next_text(&mut b_z).await, "pub:2");
    assert_eq!(next_text(&mut b_x).await, "b only");
    assert_eq!(next_text(&mut b_z).await, "b only");
    let quiet = tokio::time::timeout(Duration::from_millis(200), a_x.next()).await;
    assert!(quiet.is_err(), "gear /a got gear /b's publish: {quiet:?}");
    assert_eq!(server.registry::<String>("/a").count("all"), 2);
    assert_eq!(server.registry::<String>("/b").count("all"), 2);
    server.stop();
}

/// A blocking client that offers permessage-deflate and reads frames as they come.
struct DeflateClient(std::net::TcpStream);

impl DeflateClient {
    fn connect(addr: &str, path: &str) -> DeflateClient {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
            kythera_testkit::raw::KEY
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.contains(
                "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover"
            ),
            "{head}"
        );
        DeflateClient(s)
    }

    /// The next frame: RSV1, opcode, payload as it came.
    fn frame(&mut self) -> (bool, u8, Vec<u8>) {
        use std::io::Read;
        let mut h = [0u8; 2];
        self.0.read_exact(&mut h).unwrap();
        let len = match h[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                self.0.read_exact(&mut b).unwrap();
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                self.0.read_exact(&mut b).unwrap();
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        self.0.read_exact(&mut payload).unwrap();
        (h[0] & 0x40 != 0, h[0] & 0x0f, payload)
    }
}

#[tokio::test]
async fn publish_frame_is_compressed_for_members_that_agreed_to_deflate() {
    let server = TestServer::start(Limits::default());
    let addr = server.addr().to_string();
    let mut zipped = [
        DeflateClient::connect(&addr, "/a?name=z1"),
        DeflateClient::connect(&addr, "/a?name=z2"),
    ];
    let mut plain = connect(&server.url("/a?name=p1")).await;
    let news = "compressible breaking news; ".repeat(20);
    say(&mut plain, &format!("frame:{news}")).await;
    assert_eq!(next_text(&mut plain).await, "frame:3");
    assert_eq!(
        next_text(&mut plain).await,
        news,
        "uncompressed for a plain member"
    );
    let got: Vec<(bool, u8, Vec<u8>)> = zipped.iter_mut().map(DeflateClient::frame).collect();
    assert_eq!(got[0], got[1], "the same compressed bytes for both");
    let (rsv1, opcode, payload) = &got[0];
    assert!(*rsv1, "compressed");
    assert_eq!(*opcode, 1, "text");
    assert!(payload.len() < news.len() / 4, "{} bytes", payload.len());
    let mut inflated = Vec::new();
    kythera_engine::protocol::deflate::Inflater::default()
        .inflate(payload, &mut inflated, 1 << 20, true)
        .unwrap();
    assert_eq!(String::from_utf8(inflated).unwrap(), news);
    server.stop();
}
