//! `kythera-load` against real servers: the kythera binary (echo must pass with no
//! errors), hand-written servers that misbehave (the exit status must say so), and a
//! small chat room (broadcast mode).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use kythera_engine::protocol::codec::{self, Decoded, DecoderConfig, OpCode};
use kythera_engine::protocol::handshake::accept_key;
use serde_json::Value;

mod common;

use common::Kythera;

/// Runs kythera-load with `args` and `--json FILE`; returns its output and the JSON.
fn load(args: &[&str]) -> (Output, Option<Value>) {
    let json = std::env::temp_dir().join(format!(
        "kythera-load-test-{}-{}.json",
        std::process::id(),
        args.join("_").replace(['/', ':', '.'], "")
    ));
    let _ = std::fs::remove_file(&json);
    let out = Command::new(env!("CARGO_BIN_EXE_kythera-load"))
        .args(args)
        .args(["-q", "--json"])
        .arg(&json)
        .output()
        .expect("run kythera-load");
    let value = std::fs::read_to_string(&json)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("valid JSON"));
    let _ = std::fs::remove_file(&json);
    (out, value)
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn echo_against_kythera_counts_messages_and_no_errors() {
    let server = Kythera::start(&["--listen", "127.0.0.1:0", "--shards", "1"]);
    let url = format!("ws://{}/echo", server.addr);
    for kind in ["text", "binary"] {
        let (out, json) = load(&[
            "echo", "--url", &url, "-c", "8", "-b", "300", "-p", "4", "-d", "1", "--warmup", "0.2",
            "--kind", kind,
        ]);
        assert!(out.status.success(), "{}", describe(&out));
        let json = json.expect("a JSON report");
        assert_eq!(json["mode"], "echo");
        assert_eq!(json["established"], 8);
        assert!(json["messages"].as_u64().unwrap() > 0, "{json}");
        assert_eq!(json["errors"], 0, "{json}");
        assert!(json["latency_us"]["p50"].as_f64().unwrap() > 0.0, "{json}");
    }
}

/// A self-signed certificate for localhost and 127.0.0.1 (PEM chain, PEM key) whose
/// common name is `tag`.
fn self_signed(tag: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, tag);
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn echo_over_wss_trusting_the_certificate_and_reloaded_on_sighup() {
    let dir = std::env::temp_dir().join(format!("kythera-load-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (first, first_key) = self_signed("first");
    std::fs::write(&cert, &first).unwrap();
    std::fs::write(&key, &first_key).unwrap();
    let first_ca = dir.join("first.pem");
    std::fs::write(&first_ca, &first).unwrap();
    let port = free_port();
    let tls_addr = format!("127.0.0.1:{port}");
    let server = Kythera::start(&[
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "1",
        "--tls-listen",
        &tls_addr,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let url = format!("wss://localhost:{port}/echo");
    let echo = |url: &str, trust: &[&str]| {
        let mut args = vec![
            "echo", "--url", url, "-c", "4", "-b", "3000", "-p", "4", "-d", "0.5", "--warmup",
            "0.1",
        ];
        args.extend_from_slice(trust);
        load(&args)
    };
    let (out, json) = echo(&url, &["--ca", first_ca.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let json = json.expect("a JSON report");
    assert_eq!(json["url"], url.as_str());
    assert!(json["messages"].as_u64().unwrap() > 0, "{json}");
    assert_eq!(json["errors"], 0, "{json}");
    // --insecure checks no certificate (an address, not the name, in the URL).
    let (out, _) = echo(&format!("wss://127.0.0.1:{port}/echo"), &["--insecure"]);
    assert!(out.status.success(), "{}", describe(&out));
    // Neither: refused before connecting.
    let (out, _) = echo(&url, &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca"),
        "{}",
        describe(&out)
    );

    // A new certificate on disk and SIGHUP: new handshakes present it.
    let (second, second_key) = self_signed("second");
    std::fs::write(&cert, &second).unwrap();
    std::fs::write(&key, &second_key).unwrap();
    let second_ca = dir.join("second.pem");
    std::fs::write(&second_ca, &second).unwrap();
    server.signal(libc::SIGHUP);
    let trusted_after = |ca: &std::path::Path| {
        // The reload happens on the signal thread: give it a moment.
        (0..50).any(|_| {
            let (out, _) = echo(&url, &["--ca", ca.to_str().unwrap()]);
            out.status.success() || {
                std::thread::sleep(std::time::Duration::from_millis(100));
                false
            }
        })
    };
    assert!(
        trusted_after(&second_ca),
        "the reloaded certificate is served"
    );
    let (out, _) = echo(&url, &["--ca", first_ca.to_str().unwrap()]);
    assert!(!out.status.success(), "the old one is not");

    // A reload that fails (a key that is not PEM) keeps the pair in use.
    std::fs::write(&key, "not a key").unwrap();
    server.signal(libc::SIGHUP);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (out, _) = echo(&url, &["--ca", second_ca.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn connect_against_kythera_holds_and_closes() {
    let server = Kythera::start(&["--listen", "127.0.0.1:0", "--shards", "1"]);
    let url = format!("ws://{}/echo", server.addr);
    let (out, json) = load(&[
        "connect",
        "--url",
        &url,
        "-c",
        "50",
        "--hold",
        "0.3",
        "--source-addrs",
        "127.0.0.1,127.0.0.2",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let json = json.expect("a JSON report");
    assert_eq!(json["established"], 50);
    assert_eq!(json["errors"], 0);
    assert!(json["handshakes_per_sec"].as_f64().unwrap() > 0.0);
}

/// Accepts the upgrade on `s` (whatever the path) and returns the request head.
fn accept_upgrade(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let key = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .expect("a key")
        .trim()
        .to_string();
    write!(
        s,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(&key)
    )
    .unwrap();
    head
}

/// Reads client frames from `s` and calls `f(opcode, payload)` for each until the peer
/// is gone or `f` returns false.
fn read_frames(s: &mut TcpStream, mut f: impl FnMut(OpCode, &[u8]) -> bool) {
    let cfg = DecoderConfig::SERVER_DEFAULT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match codec::parse_header(&buf, &cfg) {
            Ok(Decoded::Complete(h, _)) if buf.len() as u64 >= h.frame_len() => {
                let used = h.frame_len() as usize;
                let payload = &mut buf[h.header_len..used];
                if let Some(mask) = h.mask {
                    kythera_engine::protocol::mask::unmask(payload, mask, 0);
                }
                let go_on = f(h.opcode, payload);
                buf.drain(..used);
                if !go_on {
                    return;
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => panic!("bad client frame: {e:?}"),
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode_frame_into(&mut out, true, 0, opcode, payload, None);
    out
}

/// A server that upgrades, then answers every message with `answer(opcode, payload)`.
fn bad_server(answer: fn(OpCode, &[u8]) -> Vec<u8>) -> SocketAddr {
    server_writing(answer, |w, bytes| w.write_all(bytes))
}

/// A server that upgrades, then answers every message with `answer(opcode, payload)`,
/// written with `write` (and a close with a close).
fn server_writing(
    answer: fn(OpCode, &[u8]) -> Vec<u8>,
    write: fn(&mut TcpStream, &[u8]) -> std::io::Result<()>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                accept_upgrade(&mut s);
                s.set_nodelay(true).unwrap();
                let mut w = s.try_clone().unwrap();
                read_frames(&mut s, |op, payload| match op {
                    OpCode::Close => {
                        let _ = w.write_all(&frame(OpCode::Close, payload));
                        false
                    }
                    _ => write(&mut w, &answer(op, payload)).is_ok(),
                });
            });
        }
    });
    addr
}

fn assert_fails_against(addr: SocketAddr, what: &str) {
    let url = format!("ws://{addr}/echo");
    let (out, json) = load(&[
        "echo", "--url", &url, "-c", "3", "-b", "40", "-d", "0.5", "--warmup", "0.1",
    ]);
    // Shown with --nocapture: what the load said about the server.
    eprintln!("{what}: {}", describe(&out));
    assert_eq!(out.status.code(), Some(1), "{what}: {}", describe(&out));
    let json = json.expect("a JSON report even when the server misbehaves");
    assert!(json["errors"].as_u64().unwrap() > 0, "{what}: {json}");
}

#[test]
fn echoes_dribbled_in_small_pieces_are_reassembled() {
    // An echo server that writes every echo a few bytes at a time (1 to 7, pausing
    // between pieces): frame headers and payloads arrive split over many receives.
    let addr = server_writing(frame, |w, mut bytes| {
        let mut size = 1;
        while !bytes.is_empty() {
            let (piece, rest) = bytes.split_at(size.min(bytes.len()));
            w.write_all(piece)?;
            bytes = rest;
            size = size % 7 + 1;
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
        Ok(())
    });
    let url = format!("ws://{addr}/echo");
    let (out, json) = load(&[
        "echo", "--url", &url, "-c", "2", "-b", "300", "-p", "3", "-d", "0.5", "--warmup", "0.1",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let json = json.expect("a JSON report");
    assert!(json["messages"].as_u64().unwrap() > 10, "{json}");
    assert_eq!(json["errors"], 0, "{json}");
}

#[test]
fn garbage_echoes_fail_the_run() {
    let addr = bad_server(|op, payload| {
        let mut wrong = payload.to_vec();
        wrong.reverse();
        frame(op, &wrong)
    });
    assert_fails_against(addr, "reversed payloads");
}

#[test]
fn wrong_opcode_fails_the_run() {
    let addr = bad_server(|_, payload| frame(OpCode::Binary, payload));
    assert_fails_against(addr, "binary echoes of text");
}

#[test]
fn non_websocket_bytes_fail_the_run() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            // Answers the upgrade with raw garbage.
            let _ = s.write_all(b"garbage garbage garbage\r\n\r\n");
        }
    });
    assert_fails_against(addr, "no handshake");
}

/// A chat room in the shape of the chat gear's: every text message of a member is sent
/// to the room's other members as `{"from":NAME,"text":TEXT,"to":null,"room":ROOM}`.
fn chat_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let members: Arc<Mutex<Vec<(String, TcpStream)>>> = Arc::default();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let members = members.clone();
            std::thread::spawn(move || {
                let head = accept_upgrade(&mut s);
                let target = head.split_whitespace().nth(1).unwrap().to_string();
                let query = target.split_once('?').map(|q| q.1).unwrap_or("");
                let param = |k: &str| {
                    query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                        .unwrap_or("")
                        .to_string()
                };
                let (name, room) = (param("name"), param("room"));
                let mut w = s.try_clone().unwrap();
                // A notice from the room itself, which the load must ignore.
                let hello = serde_json::json!({"from": null, "text": "welcome", "room": room});
                w.write_all(&frame(OpCode::Text, hello.to_string().as_bytes()))
                    .unwrap();
                members
                    .lock()
                    .unwrap()
                    .push((name.clone(), s.try_clone().unwrap()));
                read_frames(&mut s, |op, payload| {
                    match op {
                        OpCode::Text => {
                            let msg: Value = serde_json::from_slice(payload).unwrap();
                            let out = serde_json::json!({
                                "from": name, "text": msg["text"], "to": null, "room": room,
                            });
                            let bytes = frame(OpCode::Text, out.to_string().as_bytes());
                            for (other, m) in members.lock().unwrap().iter_mut() {
                                if *other != name {
                                    let _ = m.write_all(&bytes);
                                }
                            }
                            true
                        }
                        OpCode::Close => {
                            // Under the lock: a publication must not interleave with it.
                            let mut members = members.lock().unwrap();
                            members.retain(|(n, _)| *n != name);
                            let _ = w.write_all(&frame(OpCode::Close, payload));
                            false
                        }
                        _ => true,
                    }
                });
                members.lock().unwrap().retain(|(n, _)| *n != name);
            });
        }
    });
    addr
}

#[test]
fn broadcast_to_a_chat_room() {
    let addr = chat_server();
    let url = format!("ws://{addr}/chat");
    let (out, json) = load(&[
        "broadcast",
        "--url",
        &url,
        "-c",
        "5",
        "--rate",
        "500",
        "-d",
        "1",
        "--warmup",
        "0.2",
        "--threads",
        "2",
    ]);
    eprintln!("{}", describe(&out));
    assert!(out.status.success(), "{}", describe(&out));
    let json = json.expect("a JSON report");
    assert_eq!(json["established"], 6);
    assert_eq!(json["errors"], 0, "{json}");
    assert!(json["published"].as_u64().unwrap() > 100, "{json}");
    // Every subscriber gets every publication of the window (give or take the edges).
    let delivered = json["messages"].as_u64().unwrap();
    assert!(delivered >= 5 * 400, "{json}");
    assert!(json["ignored"].as_u64().unwrap() >= 5, "{json}");
    let (out, json) = load(&[
        "broadcast",
        "--url",
        &url,
        "-c",
        "3",
        "-p",
        "4",
        "-d",
        "0.5",
        "--warmup",
        "0.1",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(json.unwrap()["messages"].as_u64().unwrap() > 0);
}
