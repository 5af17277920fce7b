//! An echo server on fastwebsockets 0.10, a baseline of `tools/bench.sh`.
//!
//! It is fastwebsockets' own `examples/echo_server.rs` made into a benchmark peer: one
//! tokio current-thread runtime, hyper 1 for the HTTP upgrade (the `upgrade` feature, as
//! fastwebsockets documents it), a `FragmentCollector` per connection, each connection
//! a task polled with `tokio::task::unconstrained`, every text message sent back as
//! text and every binary message as binary. Pings are answered and close frames echoed
//! by fastwebsockets itself (`auto_pong` and `auto_close`, both on by default).
//!
//! Two deviations from the example, both in fastwebsockets' favour or neutral:
//! `TCP_NODELAY` is set on every accepted socket (kythera leaves Nagle on and writes
//! once per turn), and nothing is
//! printed per connection. With `--raw-handshake` the upgrade is answered by hand
//! (kythera's sans-I/O handshake code) and the `WebSocket` wraps the bare `TcpStream`
//! rather than hyper's boxed `Upgraded` stream, which takes hyper out of the per-message
//! path; the default is the documented hyper way.
//!
//! ```sh
//! cargo run --release -p benches --bin fastwebsockets-echo -- --port 9001
//! # prints "listening on 127.0.0.1:9001" once it accepts connections
//! ```
//!
//! `--port 0` picks a free port (the line printed names it). It runs until killed.
//!
//! With `--tls-cert FILE --tls-key FILE` it serves `wss://` through tokio-rustls (rustls
//! with aws-lc-rs, TLS 1.3 and 1.2, ALPN `http/1.1`), the usual Rust way, with the
//! hyper upgrade on top of the TLS stream: the baseline of `kythera-tls` in
//! `tools/bench.sh`.

use std::io::Write;
use std::net::SocketAddr;

use fastwebsockets::{FragmentCollector, OpCode, Role, WebSocket, WebSocketError, upgrade};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "usage: fastwebsockets-echo [--port N] [--raw-handshake] [--verbose] \
                     [--tls-cert FILE --tls-key FILE]";

struct Args {
    port: u16,
    raw_handshake: bool,
    verbose: bool,
    tls_cert: Option<String>,
    tls_key: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        port: 9001,
        raw_handshake: false,
        verbose: false,
        tls_cert: None,
        tls_key: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--port" => {
                let v = it.next().ok_or("--port needs a value")?;
                args.port = v.parse().map_err(|_| format!("bad --port {v:?}"))?;
            }
            "--raw-handshake" => args.raw_handshake = true,
            "--tls-cert" => args.tls_cert = Some(it.next().ok_or("--tls-cert needs a file")?),
            "--tls-key" => args.tls_key = Some(it.next().ok_or("--tls-key needs a file")?),
            "--verbose" => args.verbose = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

/// Whether an error is just the peer going away (the load client exits without a close
/// handshake at the end of a run); those are not worth a line on stderr.
fn is_disconnect(e: &WebSocketError) -> bool {
    match e {
        WebSocketError::UnexpectedEOF | WebSocketError::ConnectionClosed => true,
        WebSocketError::IoError(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// The echo loop, the same for both handshake paths.
async fn echo<S>(ws: WebSocket<S>) -> Result<(), WebSocketError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ws = FragmentCollector::new(ws);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
}

async fn server_upgrade(
    mut req: Request<Incoming>,
    verbose: bool,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::task::spawn(async move {
        let res = tokio::task::unconstrained(async move { echo(fut.await?).await }).await;
        if let Err(e) = res
            && (verbose || !is_disconnect(&e))
        {
            eprintln!("fastwebsockets-echo: connection error: {e}");
        }
    });
    Ok(response)
}

/// The upgrade by hand: read the request head, validate it with kythera's handshake
/// code, answer 101, then hand the bare socket to fastwebsockets.
async fn raw_upgrade(mut stream: TcpStream) -> Result<WebSocket<TcpStream>, String> {
    use kythera_engine::protocol::handshake;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            return Err("peer closed before the request head ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if buf.len() > 16 * 1024 {
            return Err("request head over 16 KiB".into());
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; handshake::MAX_HEADERS];
    let req = match handshake::parse_request(&buf, &mut headers, 16 * 1024) {
        Ok(Some(req)) => req,
        Ok(None) => return Err("incomplete request head".into()),
        Err(rejection) => return Err(format!("bad request: {rejection:?}")),
    };
    if req.head_len != buf.len() {
        return Err("bytes after the request head before the 101".into());
    }
    let mut out = Vec::with_capacity(256);
    match handshake::validate_upgrade(&req) {
        Ok(up) => {
            handshake::write_switching_protocols(&mut out, up.key, None, None, std::iter::empty());
            stream
                .write_all(&out)
                .await
                .map_err(|e| format!("writing the 101: {e}"))?;
        }
        Err(rejection) => {
            rejection.write_response(&mut out);
            let _ = stream.write_all(&out).await;
            return Err(format!("rejected upgrade: {rejection:?}"));
        }
    }
    Ok(WebSocket::after_handshake(stream, Role::Server))
}

/// hyper's HTTP/1 connection with upgrades (the documented fastwebsockets way), over a
/// plain or a TLS stream.
async fn serve_http<S>(stream: S, verbose: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let conn = http1::Builder::new()
        .serve_connection(io, service_fn(move |req| server_upgrade(req, verbose)))
        .with_upgrades();
    if let Err(e) = conn.await
        && verbose
    {
        eprintln!("fastwebsockets-echo: http: {e}");
    }
}

/// tokio-rustls' acceptor for a PEM certificate chain and key.
fn tls_acceptor(cert: &str, key: &str) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fastwebsockets-echo: {e}");
            std::process::exit(2);
        }
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match tls_acceptor(cert, key) {
            Ok(acceptor) => Some(acceptor),
            Err(e) => {
                eprintln!("fastwebsockets-echo: {e}");
                std::process::exit(2);
            }
        },
        (None, None) => None,
        _ => {
            eprintln!("fastwebsockets-echo: --tls-cert and --tls-key go together");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    let res: std::io::Result<()> = rt.block_on(async move {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], args.port))).await?;
        let addr = listener.local_addr()?;
        let mut stdout = std::io::stdout();
        writeln!(
            stdout,
            "listening on {addr} (fastwebsockets 0.10, {} handshake{})",
            if args.raw_handshake { "raw" } else { "hyper" },
            if tls.is_some() { ", TLS" } else { "" }
        )?;
        stdout.flush()?;
        let verbose = args.verbose;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and the like: say so, back off, keep serving.
                    eprintln!("fastwebsockets-echo: accept: {e}");
                    tokio::task::yield_now().await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            if let Some(acceptor) = tls.clone() {
                tokio::spawn(async move {
                    let stream = match acceptor.accept(stream).await {
                        Ok(s) => s,
                        Err(e) => {
                            if verbose {
                                eprintln!("fastwebsockets-echo: TLS: {e}");
                            }
                            return;
                        }
                    };
                    serve_http(stream, verbose).await;
                });
            } else if args.raw_handshake {
                tokio::spawn(tokio::task::unconstrained(async move {
                    match raw_upgrade(stream).await {
                        Ok(ws) => {
                            if let Err(e) = echo(ws).await
                                && (verbose || !is_disconnect(&e))
                            {
                                eprintln!("fastwebsockets-echo: connection error: {e}");
                            }
                        }
                        Err(e) => eprintln!("fastwebsockets-echo: handshake: {e}"),
                    }
                }));
            } else {
                tokio::spawn(serve_http(stream, verbose));
            }
        }
    });
    if let Err(e) = res {
        eprintln!("fastwebsockets-echo: {e}");
        std::process::exit(1);
    }
}
