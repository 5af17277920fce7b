//! Several kythera processes sharing one registry through a real Redis (Debian's
//! `redis-server`, started here on ports picked here, stopped at the end): the chat
//! gear across nodes, names raced for from every node, a node killed, Redis stopped
//! and started again, a Redis Cluster.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::Kythera;
use kythera_handler_api::{Conn, Context, Message, RegistryError, Response, Websocket};
use kythera_testkit::redis::{RedisCluster, RedisServer};
use kythera_testkit::{Closed, Event};
use serde_json::Value;
use tungstenite::Message as WsMessage;

/// One test at a time: each runs a Redis and three nodes, and the liveness deadlines
/// some of them check should not share two cores with another test's load.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The liveness TTL the nodes of these tests run with.
const TTL: Duration = Duration::from_millis(2000);

/// `n` nodes on `redis` (comma-separated URLs); node 0 has two shards, so that
/// messages also cross shards on their way.
fn start_nodes(redis: &str, n: usize) -> Vec<Kythera> {
    (0..n)
        .map(|i| {
            Kythera::start(&[
                "--listen",
                "127.0.0.1:0",
                "--shards",
                if i == 0 { "2" } else { "1" },
                "--cluster-redis",
                redis,
                "--node-id",
                &format!("node-{i}"),
                "--cluster-ttl-ms",
                &TTL.as_millis().to_string(),
            ])
        })
        .collect()
}

/// Waits until `node` sees `names` names and `members` memberships of `/chat` on
/// other nodes.
fn sees(node: &Kythera, names: usize, members: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = (
            node.metric("kythera_registry_remote_names{gear=\"/chat\"}"),
            node.metric("kythera_registry_remote_members{gear=\"/chat\"}"),
        );
        if got == (Some(names as f64), Some(members as f64)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} sees {got:?} remote names and members, expected {names} and {members}",
            node.addr
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until node `i` sees `names - local_names[i]` names and `members -
/// local_members[i]` memberships of `/chat` on the other nodes.
fn converge(nodes: &[Kythera], local_names: &[usize], local_members: &[usize]) {
    let (names, members): (usize, usize) = (local_names.iter().sum(), local_members.iter().sum());
    for (i, node) in nodes.iter().enumerate() {
        sees(node, names - local_names[i], members - local_members[i]);
    }
}

/// A chat message as a client receives it: (from, text), or the error it got.
fn parse(frame: &WsMessage) -> (String, String) {
    let WsMessage::Text(t) = frame else {
        panic!("expected text, got {frame:?}");
    };
    let v: Value = serde_json::from_str(t).unwrap();
    if let Some(e) = v.get("error") {
        panic!("error frame: {e}");
    }
    (
        v["from"].as_str().unwrap().to_owned(),
        v["text"].as_str().unwrap().to_owned(),
    )
}

fn chat_url(room: &str, name: &str) -> String {
    format!("/chat?room={room}&name={name}")
}

/// 60 users spread over `nodes`, in 5 rooms; each sends 4 direct messages (to users
/// on every node) and 4 room messages, interleaved. Every user must receive exactly
/// what was meant for it, once; from each sender in the order sent (`strict`), or,
/// on a Redis Cluster, where a node's channel and a group's channel live on different
/// Redis nodes, in the order sent per kind.
fn chat_exactly_once(nodes: &[Kythera], strict: bool) {
    const USERS: usize = 60;
    const ROOMS: usize = 5;
    const EACH: usize = 4;
    let direct_to = |i: usize, k: usize| (i + 1 + 13 * k) % USERS;
    let node_of = |i: usize| i % nodes.len();
    let room_of = |i: usize| i % ROOMS;
    // What each user receives, per sender, in the order the sender sent it.
    let mut expected: Vec<HashMap<String, Vec<String>>> = vec![HashMap::new(); USERS];
    for s in 0..USERS {
        for k in 0..EACH {
            expected[direct_to(s, k)]
                .entry(format!("u{s}"))
                .or_default()
                .push(format!("d {s} {k}"));
            for (j, e) in expected.iter_mut().enumerate() {
                if room_of(j) == room_of(s) {
                    e.entry(format!("u{s}"))
                        .or_default()
                        .push(format!("r {s} {k}"));
                }
            }
        }
    }
    let totals: Vec<usize> = expected
        .iter()
        .map(|e| e.values().map(Vec::len).sum())
        .collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let connected = Arc::new(Barrier::new(USERS + 1));
    let go = Arc::new(Barrier::new(USERS + 1));
    let users: Vec<_> = (0..USERS)
        .map(|i| {
            let (connected, go, addr, total) = (
                Arc::clone(&connected),
                Arc::clone(&go),
                addrs[node_of(i)],
                totals[i],
            );
            std::thread::spawn(move || {
                let url = chat_url(&format!("r{}", room_of(i)), &format!("u{i}"));
                let mut c =
                    kythera_testkit::connect(addr, &url).with_timeout(Duration::from_secs(20));
                connected.wait();
                go.wait();
                for k in 0..EACH {
                    let to = direct_to(i, k);
                    c.send_text(&format!(r#"{{"to":"u{to}","text":"d {i} {k}"}}"#));
                    c.send_text(&format!(r#"{{"text":"r {i} {k}"}}"#));
                }
                let got: Vec<(String, String)> = (0..total).map(|_| parse(&c.recv())).collect();
                // Exactly once: nothing more comes.
                c.expect_silence(Duration::from_millis(500));
                got
            })
        })
        .collect();
    connected.wait();
    let mut local_names = vec![0; nodes.len()];
    for i in 0..USERS {
        local_names[node_of(i)] += 1;
    }
    converge(nodes, &local_names, &local_names);
    // A name held on one node is refused on another, by the gear's own answer.
    let taken = kythera_testkit::try_connect(nodes[1].addr, &chat_url("r0", "u0")).unwrap_err();
    assert_eq!(taken.status, 409);
    assert_eq!(
        String::from_utf8_lossy(&taken.body),
        "name \"u0\" is already taken in this chat"
    );
    go.wait();
    for (j, user) in users.into_iter().enumerate() {
        let got = user.join().unwrap_or_else(|_| panic!("user u{j} failed"));
        let mut by_sender: HashMap<String, Vec<String>> = HashMap::new();
        for (from, text) in got {
            by_sender.entry(from).or_default().push(text);
        }
        for (sender, want) in &expected[j] {
            let have = by_sender.remove(sender).unwrap_or_default();
            if strict {
                assert_eq!(&have, want, "u{j} from {sender}");
            } else {
                for kind in ["d ", "r "] {
                    let pick = |v: &[String]| {
                        v.iter()
                            .filter(|t| t.starts_with(kind))
                            .cloned()
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(pick(&have), pick(want), "u{j} from {sender}");
                }
            }
        }
        assert!(by_sender.is_empty(), "u{j} got unexpected {by_sender:?}");
    }
}

#[test]
fn chat_across_three_nodes_arrives_exactly_once_in_order() {
    let _serial = serial();
    let redis = RedisServer::start();
    let nodes = start_nodes(&redis.url(), 3);
    for n in &nodes {
        assert!(n.node.is_some(), "the banner names the node");
    }
    chat_exactly_once(&nodes, true);
}

#[test]
fn chat_across_three_nodes_on_a_redis_cluster() {
    let _serial = serial();
    let redis = RedisCluster::start();
    let nodes = start_nodes(&redis.urls(), 3);
    chat_exactly_once(&nodes, false);
}

/// One node killed with SIGKILL while the others chat: they never stop serving, and
/// within the TTL plus two seconds its names are free and its members are gone from
/// their counts.
#[test]
fn a_killed_node_is_forgotten_within_ttl_plus_two_seconds() {
    let _serial = serial();
    let redis = RedisServer::start();
    let mut nodes = start_nodes(&redis.url(), 3);
    const PER_NODE: usize = 5;
    let mut clients: Vec<Vec<kythera_testkit::Client>> = (0..3)
        .map(|n| {
            (0..PER_NODE)
                .map(|j| {
                    kythera_testkit::connect(nodes[n].addr, &chat_url("k", &format!("k{n}-{j}")))
                        .with_timeout(Duration::from_secs(10))
                })
                .collect()
        })
        .collect();
    converge(&nodes, &[PER_NODE; 3], &[PER_NODE; 3]);
    // Two senders, one on each surviving node, keep talking to the room.
    let mut senders: Vec<kythera_testkit::Client> =
        vec![clients[0].remove(0), clients[1].remove(0)];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sending: Vec<_> = senders
        .drain(..)
        .enumerate()
        .map(|(s, mut c)| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.send_text(&format!(r#"{{"text":"{s} {n}"}}"#));
                    n += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                (c, n)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let _ = nodes[2].child.kill();
    let killed = Instant::now();
    let _ = nodes[2].child.wait();
    // The survivors forget it: 5 + 5 members of the room left, 4 + 5 names of /chat
    // besides a node's own (one sender per survivor was moved out, but still holds
    // its name).
    for node in &nodes[..2] {
        loop {
            let names = node.metric("kythera_registry_remote_names{gear=\"/chat\"}");
            let members = node.metric("kythera_registry_remote_members{gear=\"/chat\"}");
            if names == Some(PER_NODE as f64) && members == Some(PER_NODE as f64) {
                break;
            }
            assert!(
                killed.elapsed() <= TTL + Duration::from_secs(2),
                "after {:?} a survivor still sees {names:?} names and {members:?} members elsewhere",
                killed.elapsed()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let forgotten = killed.elapsed();
    // Its names are free.
    let reused = kythera_testkit::connect(nodes[0].addr, &chat_url("k", "k2-0"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: Vec<(kythera_testkit::Client, usize)> =
        sending.into_iter().map(|t| t.join().unwrap()).collect();
    // Every survivor in the room got every message of both senders, in order, once.
    let mut listeners: Vec<kythera_testkit::Client> = clients.drain(..2).flatten().collect();
    let sent_by: Vec<usize> = sent.iter().map(|(_, n)| *n).collect();
    listeners.extend(sent.into_iter().map(|(c, _)| c));
    for (i, c) in listeners.iter_mut().enumerate() {
        let mut next = [0usize; 2];
        loop {
            match c.next_event(Duration::from_millis(800)) {
                Event::Frame(f) => {
                    let (_, text) = parse(&f);
                    let (s, n) = text.split_once(' ').unwrap();
                    let (s, n): (usize, usize) = (s.parse().unwrap(), n.parse().unwrap());
                    assert_eq!(n, next[s], "listener {i}: from sender {s}");
                    next[s] += 1;
                }
                Event::Quiet => break,
                Event::Closed(c) => panic!("listener {i} closed: {c:?}"),
            }
        }
        assert_eq!(
            next.to_vec(),
            sent_by,
            "listener {i}: all of both senders' messages"
        );
    }
    drop(reused);
    eprintln!("killed node forgotten after {forgotten:?} (TTL {TTL:?})");
    for node in &mut nodes[..2] {
        assert!(node.is_running());
    }
}

/// Redis stopped and started again (empty, like a crash without persistence): chat on
/// one node goes on without an error, messages to other nodes are refused and counted
/// meanwhile, and delivery across nodes resumes within 5 s of Redis being back.
#[test]
fn redis_restart_is_survived() {
    let _serial = serial();
    let mut redis = RedisServer::start();
    let mut nodes = start_nodes(&redis.url(), 2);
    let url = |name: &str| chat_url("x", name);
    let mut a0 = kythera_testkit::connect(nodes[0].addr, &url("a0"));
    let mut a1 = kythera_testkit::connect(nodes[0].addr, &url("a1"));
    let mut b0 = kythera_testkit::connect(nodes[1].addr, &url("b0"));
    converge(&nodes, &[2, 1], &[2, 1]);
    a0.send_text(r#"{"to":"b0","text":"before"}"#);
    assert_eq!(parse(&b0.recv()).1, "before");

    redis.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    while nodes[0].metric("kythera_cluster_connected") != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "node 0 did not notice Redis going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Health is about this node: it still serves.
    assert_eq!(
        common::http_get(nodes[0].addr, "/healthz", false).map(|r| r.0),
        Some(200)
    );
    // Same node: direct and room messages, no error.
    for n in 0..20 {
        a0.send_text(&format!(r#"{{"to":"a1","text":"local {n}"}}"#));
        a0.send_text(&format!(r#"{{"text":"room {n}"}}"#));
        assert_eq!(parse(&a1.recv()), ("a0".into(), format!("local {n}")));
        assert_eq!(parse(&a1.recv()), ("a0".into(), format!("room {n}")));
        assert_eq!(parse(&a0.recv()), ("a0".into(), format!("room {n}")));
    }
    // Across nodes: refused and counted.
    a0.send_text(r#"{"to":"b0","text":"while down"}"#);
    let WsMessage::Text(refused) = a0.recv() else {
        panic!("expected an error frame");
    };
    assert!(refused.contains("another node"), "{refused}");
    assert!(
        nodes[0]
            .metric("kythera_cluster_dropped_total{cause=\"disconnected\"}")
            .unwrap_or(0.0)
            >= 1.0
    );

    redis.restart();
    let back = Instant::now();
    let mut probe = 0;
    'resumed: loop {
        assert!(
            back.elapsed() <= Duration::from_secs(5),
            "cross-node delivery did not resume within 5 s"
        );
        a0.send_text(&format!(r#"{{"to":"b0","text":"probe {probe}"}}"#));
        probe += 1;
        // The sender hears nothing (delivered) or an error (not yet).
        let _ = a0.next_event(Duration::from_millis(50));
        while let Event::Frame(f) = b0.next_event(Duration::from_millis(150)) {
            if parse(&f).1.starts_with("probe") {
                break 'resumed;
            }
        }
    }
    eprintln!(
        "cross-node delivery resumed {:?} after Redis restarted",
        back.elapsed()
    );
    // Names and rooms were announced again: a room message reaches the other node.
    converge(&nodes, &[2, 1], &[2, 1]);
    while let Event::Frame(_) = a0.next_event(Duration::from_millis(200)) {}
    while let Event::Frame(_) = b0.next_event(Duration::from_millis(200)) {}
    a0.send_text(r#"{"text":"after"}"#);
    assert_eq!(parse(&b0.recv()), ("a0".into(), "after".into()));
    for node in &mut nodes {
        assert!(node.is_running());
    }
}

/// A node whose Redis is not there at start says so, serves its own connections,
/// and joins once Redis comes.
#[test]
fn a_node_starts_without_redis_and_joins_when_it_comes() {
    let _serial = serial();
    let port = kythera_testkit::redis::free_port();
    let log = std::env::temp_dir().join(format!("kythera-cluster-log-{}", std::process::id()));
    let file = std::fs::File::create(&log).unwrap();
    let node = Kythera::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--cluster-redis",
            &format!("redis://127.0.0.1:{port}"),
        ],
        &[("NO_COLOR", "1")],
        Stdio::from(file),
    );
    let mut a = kythera_testkit::connect(node.addr, &chat_url("x", "a"));
    let mut b = kythera_testkit::connect(node.addr, &chat_url("x", "b"));
    a.send_text(r#"{"to":"b","text":"alone"}"#);
    assert_eq!(parse(&b.recv()).1, "alone");
    assert_eq!(node.metric("kythera_cluster_connected"), Some(0.0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("cannot reach Redis"), "{text}");
    let _redis = RedisServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.metric("kythera_cluster_connected") != Some(1.0) {
        assert!(Instant::now() < deadline, "did not connect once Redis came");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_file(&log).ok();
}

// ----- names raced for from every node, in one process -----

/// Claims the name in the query: in `connect` (`when=connect`, 409 if taken) or, for
/// other connections, from the first message (answered `ok` or `taken`).
struct Claim;

impl Websocket for Claim {
    type State = ();
    type Message = String;

    fn connect(&self, conn: &mut Conn) -> Result<(), Response> {
        if conn.query_param("when").as_deref() != Some("connect") {
            return Ok(());
        }
        let name = conn.query_param("name").unwrap_or_default();
        match conn.register(&name) {
            Ok(()) => Ok(()),
            Err(RegistryError::Taken) => Err(Response::new(409)),
            Err(e) => Err(Response::new(503).body(e.to_string())),
        }
    }

    fn init(&self, _: &mut Conn, _: &mut Context<'_, String>) {}

    fn handle_client_message(&self, _: &mut (), msg: Message<'_>, ctx: &mut Context<'_, String>) {
        if let Message::Text(name) = msg {
            match ctx.register(name) {
                Ok(()) => ctx.send_text("ok"),
                Err(RegistryError::Taken) => ctx.send_text("taken"),
                Err(e) => ctx.send_text(&e.to_string()),
            }
        }
    }

    fn handle_server_message(&self, _: &mut (), _: String, _: &mut Context<'_, String>) {}
}

/// How a contender for a name came out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// It holds the name (and was not closed within the settling time).
    Holder,
    /// Told at the handshake (409), by the gear (`taken`), or closed with 3409.
    Told(String),
}

/// 300 clients over 3 nodes race for 30 names, half of them claimed in `connect`, half
/// from a callback: afterwards each name has exactly one holder, every node sees that
/// same holder, and every other contender was told.
#[test]
fn names_raced_for_from_every_node_have_one_holder() {
    let _serial = serial();
    const NODES: usize = 3;
    const CLIENTS: usize = 300;
    const NAMES: usize = 30;
    let mut redis = RedisServer::start();
    let servers: Vec<kythera_testkit::TestServer> = (0..NODES)
        .map(|i| {
            let mut config = kythera_cluster::ClusterConfig::new(vec![redis.url()]);
            config.node_id = format!("race-{i}");
            config.ttl = TTL;
            let backplane = kythera_cluster::RedisBackplane::start(config).unwrap();
            let server = kythera_testkit::TestServer::start_with_shards(1, |b| {
                b.cluster(backplane.clone())
                    .mount_clustered("/claim", Claim)
            });
            let deadline = Instant::now() + Duration::from_secs(5);
            while !backplane.is_connected() {
                assert!(Instant::now() < deadline, "node {i} did not connect");
                std::thread::sleep(Duration::from_millis(10));
            }
            server
        })
        .collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
    let start = Arc::new(Barrier::new(CLIENTS));
    let contenders: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (addr, start) = (addrs[i % NODES], Arc::clone(&start));
            std::thread::spawn(move || {
                let name = format!("n{}", i % NAMES);
                let in_connect = i % NAMES < NAMES / 2;
                start.wait();
                let mut client = if in_connect {
                    match kythera_testkit::try_connect(
                        addr,
                        &format!("/claim?when=connect&name={name}"),
                    ) {
                        Ok(c) => c,
                        Err(r) => {
                            return (name, i % NODES, Outcome::Told(r.status.to_string()), None);
                        }
                    }
                } else {
                    let mut c = kythera_testkit::connect(addr, "/claim");
                    c.send_text(&name);
                    match c.recv_text().as_str() {
                        "ok" => c,
                        other => {
                            return (name, i % NODES, Outcome::Told(other.to_owned()), None);
                        }
                    }
                };
                // A holder that lost in Redis is closed with 3409 soon after.
                let outcome = match client.next_event(Duration::from_secs(3)) {
                    Event::Quiet => Outcome::Holder,
                    Event::Closed(Closed::Frame(Some((3409, reason)))) => {
                        Outcome::Told(format!("3409 {reason}"))
                    }
                    other => panic!("contender {i} for {name}: {other:?}"),
                };
                // Holders stay open until the views are checked.
                (name, i % NODES, outcome, Some(client))
            })
        })
        .collect();
    let mut holders: HashMap<String, Vec<usize>> = HashMap::new();
    let mut told: HashMap<String, usize> = HashMap::new();
    let mut open = Vec::new();
    for c in contenders {
        let (name, node, outcome, client) = c.join().unwrap();
        open.extend(client);
        match outcome {
            Outcome::Holder => holders.entry(name).or_default().push(node),
            Outcome::Told(how) => *told.entry(how).or_default() += 1,
        }
    }
    assert_eq!(holders.len(), NAMES, "every name has a holder: {holders:?}");
    for (name, nodes) in &holders {
        assert_eq!(nodes.len(), 1, "{name} has holders on nodes {nodes:?}");
    }
    assert_eq!(told.values().sum::<usize>(), CLIENTS - NAMES, "{told:?}");
    eprintln!("losers were told: {told:?}");
    // Every node sees the same holder: its own connection on the holder's node, an
    // alias of a connection on that node elsewhere.
    let deadline = Instant::now() + Duration::from_secs(5);
    'views: loop {
        let mut agree = true;
        for (name, nodes) in &holders {
            for (i, s) in servers.iter().enumerate() {
                let held = s.registry::<String>("/claim").lookup(name);
                let ok = match held {
                    Some(c) => c.is_remote() != (i == nodes[0]),
                    None => false,
                };
                agree &= ok;
            }
        }
        if agree {
            break 'views;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes' views of the names differ"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(open);

    // While Redis is away each node decides alone, so two nodes can both hand out a
    // name; when Redis is back the nodes announce their names again, Redis decides,
    // and the loser is closed with 3409, for names claimed from a callback and in
    // `connect` alike.
    redis.stop();
    let backplanes: Vec<_> = servers
        .iter()
        .map(|s| s.handle().backplane().unwrap().clone())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while backplanes.iter().any(|b| b.link().is_connected()) {
        assert!(
            Instant::now() < deadline,
            "the nodes did not notice Redis going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut twins = Vec::new();
    for (i, s) in servers.iter().enumerate().take(2) {
        let mut c = s.connect("/claim");
        c.send_text("twin");
        assert_eq!(c.recv_text(), "ok", "node {i} decides alone");
        twins.push(c);
        twins.push(s.connect("/claim?when=connect&name=twin-c"));
    }
    redis.restart();
    let mut closed = Vec::new();
    for (i, c) in twins.iter_mut().enumerate() {
        match c.next_event(Duration::from_secs(6)) {
            Event::Closed(Closed::Frame(Some((3409, reason)))) => closed.push((i, reason)),
            Event::Quiet => {}
            other => panic!("twin {i}: {other:?}"),
        }
    }
    assert_eq!(closed.len(), 2, "one loser per name: {closed:?}");
    assert_ne!(closed[0].0 % 2, closed[1].0 % 2, "{closed:?}");
    for name in ["twin", "twin-c"] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let local: usize = servers
                .iter()
                .filter(|s| {
                    s.registry::<String>("/claim")
                        .lookup(name)
                        .is_some_and(|c| !c.is_remote())
                })
                .count();
            let seen = servers
                .iter()
                .all(|s| s.registry::<String>("/claim").lookup(name).is_some());
            if local == 1 && seen {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: {local} local holders");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Who holds `name` in `/chat`, as Redis says: (node, connection id).
fn holder(redis: &RedisServer, name: &str) -> Option<(String, u64)> {
    let reply = kythera_testkit::redis::command(
        redis.port(),
        &format!("HGET kythera:{{/chat}}:names {name}"),
    )
    .unwrap();
    let value = reply.lines().nth(1)?;
    let (node, conn) = value.split_once('\t')?;
    Some((node.to_owned(), conn.parse().ok()?))
}

/// How many nodes Redis lists as live.
fn node_count(redis: &RedisServer) -> String {
    kythera_testkit::redis::command(redis.port(), "HLEN kythera:nodes")
        .unwrap()
        .trim()
        .to_owned()
}

/// A node handed over to a new process (the same options, `--node-id` included, plus
/// `--take-over`). While the two processes run side by side, the new one is a node of
/// its own (a temporary id): a user held back on the old process keeps its name and
/// room there, the users that moved are reachable on the new one, and a room whose
/// members all moved still gets the other node's messages. Once the old process has
/// left, the new one takes the node's id: Redis holds every name under it, the
/// temporary id is gone, and messages cross both ways.
#[test]
fn a_node_handed_over_takes_over_its_node_id_in_the_cluster() {
    let _serial = serial();
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("kythera-cluster-ho-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("handover.sock");
    let socket = socket.to_str().unwrap();
    let url = redis.url();
    let ttl = TTL.as_millis().to_string();
    let node0 = |listen: &str, take_over: bool| {
        let mut args = vec![
            "--listen",
            listen,
            "--shards",
            "1",
            "--cluster-redis",
            &url,
            "--node-id",
            "node-0",
            "--cluster-ttl-ms",
            &ttl,
            "--handover-socket",
            socket,
        ];
        if take_over {
            args.extend(["--take-over", socket]);
        }
        Kythera::start(&args)
    };
    let old = node0("127.0.0.1:0", false);
    let other = Kythera::start(&[
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "1",
        "--cluster-redis",
        &url,
        "--node-id",
        "node-1",
        "--cluster-ttl-ms",
        &ttl,
    ]);
    let connect = |addr: SocketAddr, name: &str| {
        kythera_testkit::connect(addr, &chat_url("h", name)).with_timeout(Duration::from_secs(10))
    };
    let mut users: Vec<_> = (0..3)
        .map(|i| connect(old.addr, &format!("h{i}")))
        .collect();
    let mut x = connect(other.addr, "x");
    // p, alone in room q, is held back on the old process by the first fragment of a
    // message, more than a connection takes along (a ping behind it: its pong says
    // the server has read it).
    let mut p = kythera_testkit::raw::RawClient::open(old.addr, &chat_url("q", "p"));
    let mut late = br#"{"text":"late"}"#.to_vec();
    late.resize(140 * 1024, b' ');
    let mut first = kythera_testkit::raw::masked(1, &late);
    first[0] &= 0x7f; // FIN clear
    p.send(&first);
    p.send(&kythera_testkit::raw::masked(9, b"p"));
    let mut buf = [0u8; 256];
    assert_eq!(p.read_frame_into(&mut buf).unwrap(), (10, 1), "a pong");
    sees(&other, 4, 4);
    let (_, p_conn) = holder(&redis, "p").unwrap();

    let addr = old.addr.to_string();
    let new = node0(&addr, true);
    // The users move to the new process, which claims their names under its
    // temporary id; p stays behind, its name still node-0's.
    let deadline = Instant::now() + Duration::from_secs(10);
    let temp = loop {
        let held: Vec<_> = (0..3)
            .filter_map(|i| holder(&redis, &format!("h{i}")))
            .collect();
        if held.len() == 3 && held.iter().all(|(n, _)| n != "node-0") {
            break held[0].0.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the users' names moved: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(temp.starts_with("node-0.next-"), "{temp}");
    assert_eq!(holder(&redis, "p"), Some(("node-0".into(), p_conn)));
    // node-0's liveness key gone while the old process still serves p (as when it is
    // cut off from Redis for longer than the TTL): the new process keeps its
    // temporary id, since the handover is not over.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        kythera_testkit::redis::command(redis.port(), "DEL kythera:alive:{node-0}").unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(holder(&redis, "h0").map(|(n, _)| n), Some(temp.clone()));
    // Another node may have taken node-0 for gone meanwhile (its key was missing when it
    // looked) and removed it; the old process's next heartbeat puts it back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while node_count(&redis) != ":3" {
        assert!(Instant::now() < deadline, "3 nodes: {}", node_count(&redis));
        std::thread::sleep(Duration::from_millis(20));
    }
    sees(&other, 4, 4);
    sees(&new, 2, 2);
    // Room h's members are all on the new process now: the other node still reaches
    // them, and p's name is still known (a message to it is not refused).
    x.send_text(r#"{"to":"p","text":"parked"}"#);
    x.send_text(r#"{"text":"during"}"#);
    assert_eq!(parse(&x.recv()), ("x".into(), "during".into()));
    for u in &mut users {
        assert_eq!(parse(&u.recv()), ("x".into(), "during".into()));
    }
    x.send_text(r#"{"to":"h1","text":"direct"}"#);
    assert_eq!(parse(&users[1].recv()), ("x".into(), "direct".into()));
    // A direct message (a typed server message) from a user on the new process to p,
    // still on the old one: the two processes are two nodes, Redis carries it.
    users[0].send_text(r#"{"to":"p","text":"from h0"}"#);
    for want in [r#""text":"parked""#, r#""text":"from h0""#] {
        let (op, len) = p.read_frame_into(&mut buf).unwrap();
        assert_eq!(op, 1);
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(text.contains(want), "{text}");
    }

    // The end of p's message: p answers for itself on the old process, then moves,
    // and the old process leaves.
    p.send(&kythera_testkit::raw::masked(0, b""));
    let (op, len) = p.read_frame_into(&mut buf).unwrap();
    assert_eq!(op, 1);
    let text = std::str::from_utf8(&buf[..len]).unwrap();
    assert!(text.contains(r#""text":"late""#), "{text}");
    assert!(
        old.wait(Duration::from_secs(15)).success(),
        "the old process exits 0"
    );
    // The new process takes node-0's id (within a liveness period): every name is
    // node-0's again and the temporary id is gone.
    let deadline = Instant::now() + 2 * TTL + Duration::from_secs(5);
    loop {
        let held: Vec<_> = ["h0", "h1", "h2", "p"]
            .iter()
            .filter_map(|n| holder(&redis, n))
            .collect();
        if held.len() == 4 && held.iter().all(|(n, _)| n == "node-0") && node_count(&redis) == ":2"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-0's names: {held:?}, {} live nodes",
            node_count(&redis)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        new.metric("kythera_cluster_node{node=\"node-0\"}"),
        Some(1.0)
    );
    let nodes = [new, other];
    converge(&nodes, &[4, 1], &[4, 1]);
    x.send_text(r#"{"to":"h1","text":"direct"}"#);
    assert_eq!(parse(&users[1].recv()), ("x".into(), "direct".into()));
    x.send_text(r#"{"to":"p","text":"to p"}"#);
    let (_, len) = p.read_frame_into(&mut buf).unwrap();
    let text = std::str::from_utf8(&buf[..len]).unwrap();
    assert!(text.contains(r#""text":"to p""#), "{text}");
    x.send_text(r#"{"text":"room"}"#);
    assert_eq!(parse(&x.recv()), ("x".into(), "room".into()));
    for u in &mut users {
        assert_eq!(parse(&u.recv()), ("x".into(), "room".into()));
    }
    users[2].send_text(r#"{"to":"x","text":"back"}"#);
    assert_eq!(parse(&x.recv()), ("h2".into(), "back".into()));
    drop(users);
    drop(x);
    drop(p);
    for node in nodes {
        node.signal(libc::SIGTERM);
        assert!(node.wait(Duration::from_secs(15)).success());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
