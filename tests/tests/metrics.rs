//! `GET /metrics` and `GET /healthz` on the engine's own port, after real traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use engine::config::Limits;
use handler_api::{Conn, Context, Message, Response, Websocket};
use tungstenite::Message as WsMessage;

struct Echo;

impl Websocket for Echo {
    type State = ();
    type Message = ();

    fn connect(&self, conn: &mut Conn) -> Result<(), Response> {
        if conn.query_param("no").is_some() {
            return Err(Response::new(403).body("no"));
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

/// A plain HTTP GET; returns status, content type and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    (status, ctype, body.to_owned())
}

/// The value of the sample line that starts with `series` (name and labels).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no sample {series} in\n{metrics}"))
}

#[test]
fn metrics_count_connections_frames_bytes_closes_and_rejections() {
    let server = engine::Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(2)
        .limits(Limits::default())
        .mount("/echo", Echo)
        .build()
        .unwrap()
        .spawn();
    let addr = server.addr();
    let url = format!("ws://{addr}/echo");
    let (mut a, _) = tungstenite::connect(&url).unwrap();
    let (mut b, _) = tungstenite::connect(&url).unwrap();
    for i in 0..10 {
        a.send(WsMessage::text(format!("m{i}"))).unwrap();
        assert_eq!(a.read().unwrap(), WsMessage::text(format!("m{i}")));
    }
    b.send(WsMessage::text("bye")).unwrap();
    assert!(matches!(b.read().unwrap(), WsMessage::Close(_)));
    while b.read().is_ok() {}
    assert!(tungstenite::connect(format!("{url}?no=1")).is_err());
    assert!(tungstenite::connect(format!("ws://{addr}/nowhere")).is_err());

    let (status, ctype, m) = get(addr, "/metrics");
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert_eq!(sample(&m, "kythera_connections{gear=\"/echo\"}"), 1.0);
    assert_eq!(sample(&m, "kythera_frames_in_total{gear=\"/echo\"}"), 11.0);
    assert_eq!(sample(&m, "kythera_frames_out_total{gear=\"/echo\"}"), 11.0);
    assert!(sample(&m, "kythera_bytes_in_total{gear=\"/echo\"}") > 10.0 * 8.0);
    assert!(sample(&m, "kythera_bytes_out_total{gear=\"/echo\"}") >= 10.0 * 4.0);
    assert_eq!(
        sample(
            &m,
            "kythera_closes_sent_total{gear=\"/echo\",code=\"other\"}"
        ),
        1.0,
        "the gear's 4000"
    );
    assert_eq!(
        sample(
            &m,
            "kythera_handshakes_rejected_total{gear=\"/echo\",status=\"403\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "kythera_handshakes_rejected_total{gear=\"\",status=\"404\"}"
        ),
        1.0
    );
    let loops: f64 = (0..2)
        .map(|s| {
            sample(
                &m,
                &format!("kythera_loop_iterations_total{{shard=\"{s}\"}}"),
            )
        })
        .sum();
    assert!(loops > 0.0);
    assert!(m.contains("kythera_registry_dropped_full_total{gear=\"/echo\"} 0"));
    assert!(m.trim_end().ends_with("# EOF"));

    let (status, _, body) = get(addr, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // An upgrade request to the metrics path is routed like any other: no gear there.
    assert!(tungstenite::connect(format!("ws://{addr}/metrics")).is_err());
    a.close(None).ok();
    server.stop().unwrap();
}
