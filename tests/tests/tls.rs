//! `wss://` on the engine's TLS listeners (issue 19), against a rustls client under
//! tungstenite, with certificates made at test time (rcgen): echo of several sizes,
//! what `connect` is told (SNI, version, resumption), resumption seen from the client,
//! certificates a client must refuse, bad input counted by cause, a certificate reload
//! under traffic, and the record layer after the handshake (every suite of both
//! versions, key updates, an altered record, a `close_notify`). Both drivers: the suite runs again with `KYTHERA_IO=epoll`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kythera_engine::config::Limits;
use kythera_engine::{RunningServer, Server, TlsConfig};
use kythera_handler_api::{Conn, Context, Message, Websocket};
use kythera_testkit::Echo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tungstenite::{Message as WsMessage, WebSocket};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A test CA and a way to issue server certificates from it.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kythera test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            params,
            key,
        }
    }

    /// A certificate for `localhost` (PEM chain, PEM key), valid now unless `expired`;
    /// `tag` goes into its common name, to tell two apart.
    fn issue(&self, tag: &str, expired: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, tag);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A root store with this CA only.
    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        roots
    }

    /// A client that trusts this CA only, with session resumption on (rustls' default).
    fn client(&self) -> Arc<ClientConfig> {
        let mut config = ClientConfig::builder()
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// Tells the client, as its first message, what `connect` saw of the TLS session.
struct TlsInfo;

impl Websocket for TlsInfo {
    type State = ();
    type Message = ();

    fn init(&self, conn: &mut Conn, ctx: &mut Context<'_, ()>) {
        let text = match conn.tls() {
            Some(t) => format!(
                "sni={} version={} resumed={}",
                t.server_name.as_deref().unwrap_or("-"),
                t.version,
                t.resumed
            ),
            None => "plain".to_owned(),
        };
        ctx.send_text(&text);
    }

    fn handle_client_message(&self, _: &mut (), _: Message<'_>, _: &mut Context<'_, ()>) {}

    fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}
}

fn start(tls: &TlsConfig, limits: Limits) -> RunningServer {
    Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .tls_listen("127.0.0.1:0".parse().unwrap())
        .tls(tls.clone())
        .shards(2)
        .limits(limits)
        .mount("/echo", Echo)
        .mount("/info", TlsInfo)
        .build()
        .unwrap()
        .spawn()
}

/// A test CA, a certificate from it (common name `first`), and a server on both kinds
/// of listener with that certificate.
fn setup(limits: Limits) -> (Ca, TlsConfig, RunningServer) {
    let ca = Ca::new();
    let (cert, key) = ca.issue("first", false);
    let tls = TlsConfig::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
    let server = start(&tls, limits);
    (ca, tls, server)
}

type Wss = WebSocket<StreamOwned<ClientConnection, TcpStream>>;

/// A TLS connection to `addr` for `name`, handshake done (or its error).
fn tls_stream(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    name: &str,
) -> Result<StreamOwned<ClientConnection, TcpStream>, std::io::Error> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    tcp.set_write_timeout(Some(TIMEOUT))?;
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let conn = ClientConnection::new(Arc::clone(config), server_name).unwrap();
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

fn wss(addr: SocketAddr, config: &Arc<ClientConfig>, path: &str) -> Wss {
    let stream = tls_stream(addr, config, "localhost").unwrap();
    let (ws, response) =
        tungstenite::client::client(format!("wss://localhost:{}{path}", addr.port()), stream)
            .unwrap();
    assert_eq!(response.status(), 101);
    ws
}

/// The TLS counters of every shard, added up.
fn tls_counts(server: &RunningServer) -> [u64; 5] {
    let mut sum = [0; 5];
    for c in server.handle().stats() {
        for (s, v) in sum.iter_mut().zip([
            c.tls_handshakes,
            c.tls_failed_not_tls,
            c.tls_failed_refused,
            c.tls_failed_protocol,
            c.tls_failed_incomplete,
        ]) {
            *s += v;
        }
    }
    sum
}

/// Waits until `check` holds for the TLS counters (they are updated by the shards).
fn wait_counts(server: &RunningServer, what: &str, check: impl Fn([u64; 5]) -> bool) {
    let start = Instant::now();
    while !check(tls_counts(server)) {
        assert!(
            start.elapsed() < TIMEOUT,
            "{what}: counters {:?}",
            tls_counts(server)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn echoes_text_and_binary_of_every_size_over_wss_beside_plain_ws() {
    let (ca, _tls, server) = setup(Limits::default());
    let client = ca.client();
    let mut ws = wss(server.handle_tls_addr(), &client, "/echo");
    for len in [
        0,
        1,
        125,
        126,
        1000,
        16 * 1024,
        65_535,
        65_536,
        300_000,
        1 << 20,
    ] {
        let text = "é".repeat(len / 2);
        ws.send(WsMessage::text(text.clone())).unwrap();
        assert_eq!(ws.read().unwrap(), WsMessage::text(text), "text of {len}");
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        ws.send(WsMessage::binary(bytes.clone())).unwrap();
        assert_eq!(
            ws.read().unwrap(),
            WsMessage::binary(bytes),
            "binary of {len}"
        );
    }
    // Several messages in flight at once, sealed into records together.
    for i in 0..50 {
        ws.send(WsMessage::text(format!("m{i}"))).unwrap();
    }
    for i in 0..50 {
        assert_eq!(ws.read().unwrap(), WsMessage::text(format!("m{i}")));
    }
    ws.close(None).unwrap();
    while ws.read().is_ok() {}

    // The plain listener still speaks plain WebSocket.
    let plain = server.addrs()[0];
    let (mut p, _) = tungstenite::connect(format!("ws://{plain}/info")).unwrap();
    assert_eq!(p.read().unwrap(), WsMessage::text("plain"));
    wait_counts(&server, "one handshake", |c| c[0] == 1);
}

#[test]
fn connect_sees_the_server_name_and_a_resumed_session() {
    let (ca, _tls, server) = setup(Limits::default());
    let client = ca.client();
    let addr = server.handle_tls_addr();

    let mut first = wss(addr, &client, "/info");
    assert_eq!(
        first.read().unwrap(),
        WsMessage::text("sni=localhost version=TLSv1.3 resumed=false")
    );
    // TLS 1.3 tickets arrive after the handshake; reading the first message took them.
    first.close(None).unwrap();
    while first.read().is_ok() {}

    let stream = tls_stream(addr, &client, "localhost").unwrap();
    assert_eq!(
        stream.conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the client resumed with a ticket"
    );
    let (mut second, _) =
        tungstenite::client::client(format!("wss://localhost:{}/info", addr.port()), stream)
            .unwrap();
    assert_eq!(
        second.read().unwrap(),
        WsMessage::text("sni=localhost version=TLSv1.3 resumed=true")
    );

    // A TLS 1.2 client is served too.
    let tls12 = Arc::new(
        ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_root_certificates(ca.roots())
            .with_no_client_auth(),
    );
    let mut old = wss(addr, &tls12, "/info");
    assert_eq!(
        old.read().unwrap(),
        WsMessage::text("sni=localhost version=TLSv1.2 resumed=false")
    );
}

#[test]
fn clients_refuse_a_wrong_name_and_an_expired_certificate_and_both_are_counted() {
    let (ca, tls, server) = setup(Limits::default());
    let client = ca.client();
    let addr = server.handle_tls_addr();

    let err = tls_stream(addr, &client, "elsewhere.example").unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");

    let (cert, key) = ca.issue("expired", true);
    tls.reload_from_pem(cert.as_bytes(), key.as_bytes())
        .unwrap();
    let err = tls_stream(addr, &client, "localhost").unwrap_err();
    assert!(err.to_string().to_lowercase().contains("expired"), "{err}");
    wait_counts(&server, "two refusals", |c| c[2] == 2 && c[0] == 0);
}

#[test]
fn bad_input_costs_a_bounded_connection_and_is_counted_by_cause() {
    let (ca, _tls, server) = setup(Limits {
        handshake_timeout: Duration::from_secs(1),
        ..Limits::default()
    });
    let addr = server.handle_tls_addr();

    // A plain HTTP request to the TLS port: a plain 400 that says so, then the close.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("speaks TLS"), "{answer}");

    // Garbage that looks like a handshake record at first, then is not TLS.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(&[22, 3, 1, 0, 5, 1, 0, 0, 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff])
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);

    // Half a ClientHello, then silence: closed by the handshake timeout.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(&[22, 3, 1, 0, 200, 1, 0, 0, 196]).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed by the handshake timeout"
    );

    // A client that connects and leaves without a byte.
    drop(TcpStream::connect(addr).unwrap());

    wait_counts(&server, "one of each cause", |c| {
        c[1] == 1 && c[3] == 1 && c[4] == 2
    });
    // None of it disturbed a good client.
    let mut ws = wss(addr, &ca.client(), "/echo");
    ws.send(WsMessage::text("still here")).unwrap();
    assert_eq!(ws.read().unwrap(), WsMessage::text("still here"));
}

#[test]
fn a_reload_under_traffic_drops_no_connection_and_new_handshakes_get_the_new_certificate() {
    let (ca, tls, server) = setup(Limits::default());
    let client = ca.client();
    let addr = server.handle_tls_addr();
    let common_name = |s: &StreamOwned<ClientConnection, TcpStream>| {
        let der = s.conn.peer_certificates().unwrap()[0].to_vec();
        if der.windows(5).any(|w| w == b"first") {
            "first"
        } else if der.windows(6).any(|w| w == b"second") {
            "second"
        } else {
            "?"
        }
    };

    let mut conns: Vec<Wss> = (0..4).map(|_| wss(addr, &client, "/echo")).collect();
    let (cert2, key2) = ca.issue("second", false);
    // A reload that fails keeps the old pair.
    assert!(tls.reload_from_pem(b"not pem", key2.as_bytes()).is_err());
    // A client of its own each time: a resumed session would show the certificate of
    // the session it resumes.
    assert_eq!(
        common_name(&tls_stream(addr, &ca.client(), "localhost").unwrap()),
        "first"
    );
    for round in 0..200 {
        if round == 100 {
            tls.reload_from_pem(cert2.as_bytes(), key2.as_bytes())
                .unwrap();
        }
        for (i, ws) in conns.iter_mut().enumerate() {
            let text = format!("{round}/{i}");
            ws.send(WsMessage::text(text.clone())).unwrap();
            assert_eq!(ws.read().unwrap(), WsMessage::text(text));
        }
    }
    assert_eq!(
        common_name(&tls_stream(addr, &ca.client(), "localhost").unwrap()),
        "second"
    );
    assert_eq!(tls.generation(), 1);
}

#[test]
fn every_cipher_suite_of_both_versions_echoes_and_tls_1_3_keys_update() {
    use rustls::crypto::aws_lc_rs::{cipher_suite as suite, default_provider};
    let (ca, _tls, server) = setup(Limits::default());
    let addr = server.handle_tls_addr();
    for (version, suite) in [
        (&rustls::version::TLS13, suite::TLS13_AES_128_GCM_SHA256),
        (&rustls::version::TLS13, suite::TLS13_AES_256_GCM_SHA384),
        (
            &rustls::version::TLS13,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
        ),
        (
            &rustls::version::TLS12,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS12,
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            &rustls::version::TLS12,
            suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ] {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..default_provider()
        };
        let client = Arc::new(
            ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(ca.roots())
                .with_no_client_auth(),
        );
        let mut ws = wss(addr, &client, "/echo");
        let name = format!("{:?}", suite.suite());
        assert_eq!(
            ws.get_ref().conn.negotiated_cipher_suite(),
            Some(suite),
            "{name}"
        );
        let tls13 = version == &rustls::version::TLS13;
        for round in 0..3 {
            if tls13 && round > 0 {
                // The client's KeyUpdate asks for the server's: what follows in both
                // directions is under new keys.
                ws.get_mut().conn.refresh_traffic_keys().unwrap();
            }
            // Several records per message (over 16 KiB), and several messages per
            // record.
            for len in [0, 125, 16 * 1024, 100_000] {
                let bytes: Vec<u8> = (0..len).map(|i| (i * 13 + round) as u8).collect();
                ws.send(WsMessage::binary(bytes.clone())).unwrap();
                assert_eq!(ws.read().unwrap(), WsMessage::binary(bytes), "{name} {len}");
            }
            for i in 0..20 {
                ws.send(WsMessage::text(format!("{name} {round}/{i}")))
                    .unwrap();
            }
            for i in 0..20 {
                assert_eq!(
                    ws.read().unwrap(),
                    WsMessage::text(format!("{name} {round}/{i}"))
                );
            }
        }
    }
    wait_counts(&server, "six handshakes, no failure", |c| {
        c[0] == 6 && c[1..] == [0, 0, 0, 0]
    });
}

#[test]
fn an_altered_record_ends_its_connection_and_a_close_notify_ends_what_is_read() {
    let (ca, _tls, server) = setup(Limits::default());
    let addr = server.handle_tls_addr();
    let client = ca.client();

    // One bit of a record flipped: the record does not open, the connection is closed
    // and counted; the server's other connections go on.
    let mut other = wss(addr, &client, "/echo");
    let mut s = tls_stream(addr, &client, "localhost").unwrap();
    s.conn
        .writer()
        .write_all(b"GET /echo HTTP/1.1\r\n")
        .unwrap();
    let mut records = Vec::new();
    s.conn.write_tls(&mut records).unwrap();
    let last = records.len() - 1;
    records[last - 20] ^= 1;
    s.sock.write_all(&records).unwrap();
    let mut rest = Vec::new();
    let _ = s.sock.read_to_end(&mut rest);
    wait_counts(&server, "one protocol failure", |c| c[3] == 1);
    other.send(WsMessage::text("still here")).unwrap();
    assert_eq!(other.read().unwrap(), WsMessage::text("still here"));

    // After the client's close_notify nothing it sends is read: bytes that are no
    // records are not a failure then.
    let mut ws = wss(addr, &client, "/echo");
    ws.send(WsMessage::text("before")).unwrap();
    assert_eq!(ws.read().unwrap(), WsMessage::text("before"));
    let s = ws.get_mut();
    s.conn.send_close_notify();
    while s.conn.wants_write() {
        s.conn.write_tls(&mut s.sock).unwrap();
    }
    s.sock.write_all(&[0xff; 100]).unwrap();
    s.sock.shutdown(std::net::Shutdown::Write).unwrap();
    // The end of the stream came with the last bytes (one epoll edge for both): the
    // server sees it and closes, rather than waiting for the idle timeout.
    if let Err(err) = s.sock.read_to_end(&mut rest) {
        assert!(
            !matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the server did not close: {err}"
        );
    }
    other.send(WsMessage::text("and here")).unwrap();
    assert_eq!(other.read().unwrap(), WsMessage::text("and here"));
    wait_counts(&server, "still one protocol failure", |c| {
        c[0] == 3 && c[3] == 1
    });
}

#[test]
fn a_request_and_a_close_notify_in_the_flight_of_the_finished_are_answered() {
    let (ca, _tls, server) = setup(Limits::default());
    let tcp = TcpStream::connect(server.handle_tls_addr()).unwrap();
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = ClientConnection::new(ca.client(), name).unwrap();
    // Written before the handshake is done: rustls seals it right behind its Finished.
    conn.writer()
        .write_all(
            b"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        if s.conn.wants_write() {
            s.conn.write_tls(&mut s.sock).unwrap();
        } else {
            s.conn.read_tls(&mut s.sock).unwrap();
            s.conn.process_new_packets().unwrap();
        }
    }
    // Finished, the request and the close_notify leave together.
    s.conn.send_close_notify();
    let mut flight = Vec::new();
    while s.conn.wants_write() {
        s.conn.write_tls(&mut flight).unwrap();
    }
    s.sock.write_all(&flight).unwrap();
    let mut answer = [0; 12];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 101");
    wait_counts(&server, "one handshake", |c| {
        c[0] == 1 && c[1..] == [0, 0, 0, 0]
    });
}

/// The first TLS address of a running server.
trait TlsAddr {
    fn handle_tls_addr(&self) -> SocketAddr;
}

impl TlsAddr for RunningServer {
    fn handle_tls_addr(&self) -> SocketAddr {
        self.tls_addrs()[0]
    }
}
