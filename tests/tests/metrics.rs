//! `GET /metrics` and `GET /healthz` on the engine's own port, after real traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use kythera_engine::config::Limits;
use kythera_handler_api::{Conn, Context, Message, Websocket};
use tungstenite::Message as WsMessage;

use kythera_testkit::Echo;

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
    let server = kythera_engine::Server::builder()
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
    assert!(tungstenite::connect(format!("{url}?reject=1")).is_err());
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

/// The metric families in a text: from its `# TYPE` lines, with the `_total` a counter's
/// samples carry.
fn families(metrics: &str) -> std::collections::BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            })
        })
        .collect()
}

/// README's metric table comes from the code: every family a server (here a cluster
/// node, so that the backplane's are there too; it needs no reachable Redis for that)
/// serves is in the table, and the table names nothing else.
#[test]
fn the_readme_lists_exactly_the_metrics_served() {
    let backplane =
        kythera_cluster::RedisBackplane::start(kythera_cluster::ClusterConfig::new(vec![
            "redis://127.0.0.1:1".into(),
        ]))
        .unwrap();
    let server = kythera_engine::Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .cluster(backplane)
        .mount_clustered("/echo", Clustered)
        .build()
        .unwrap()
        .spawn();
    let addr = server.addr();
    // Something in every family that appears once it counts something: a close each
    // way and a rejection.
    let url = format!("ws://{addr}/echo");
    let (mut ws, _) = tungstenite::connect(&url).unwrap();
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    assert!(tungstenite::connect(format!("ws://{addr}/nowhere")).is_err());
    let (_, _, metrics) = get(addr, "/metrics");
    let served = families(&metrics);
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = readme
        .lines()
        .filter(|l| l.starts_with("| `kythera_"))
        .flat_map(|l| {
            let first_cell = l.split('|').nth(1).unwrap_or_default();
            first_cell
                .split('`')
                .filter(|t| t.starts_with("kythera_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    let missing: Vec<_> = served.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "README's metric table: missing {missing:?}, not served {stale:?}"
    );
    drop(server);
}

/// A gear with a message type that crosses nodes (it needs no behaviour here).
struct Clustered;

impl Websocket for Clustered {
    type State = ();
    type Message = String;
    fn init(&self, _: &mut Conn, _: &mut Context<'_, String>) {}
    fn handle_client_message(&self, _: &mut (), _: Message<'_>, _: &mut Context<'_, String>) {}
    fn handle_server_message(&self, _: &mut (), _: String, _: &mut Context<'_, String>) {}
}
