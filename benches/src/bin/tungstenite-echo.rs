//! An echo server on tokio-tungstenite 0.30, a second baseline for
//! `tools/bench.sh`.
//!
//! One tokio current-thread runtime; each accepted socket (with `TCP_NODELAY`, which
//! kythera does not set: it writes once per turn) gets a task that runs tokio-tungstenite's `accept_async` and then sends
//! every text message back as text and every binary message as binary (`send`: one
//! write and flush per message). tungstenite answers pings and close frames itself.
//!
//! ```sh
//! cargo run --release -p benches --bin tungstenite-echo -- --port 9002
//! # prints "listening on 127.0.0.1:9002" once it accepts connections
//! ```
//!
//! `--port 0` picks a free port (the line printed names it). It runs until killed.

use std::io::Write;
use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{Error, Message};

const USAGE: &str = "usage: tungstenite-echo [--port N] [--verbose]";

/// Whether an error is just the peer going away (the load client exits without a close
/// handshake at the end of a run).
fn is_disconnect(e: &Error) -> bool {
    match e {
        Error::ConnectionClosed | Error::AlreadyClosed => true,
        Error::Protocol(p) => matches!(
            p,
            tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake
        ),
        Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

async fn serve(stream: TcpStream) -> Result<(), Error> {
    let mut ws = tokio_tungstenite::accept_async(stream).await?;
    // Pings are answered by tungstenite. After a close frame tungstenite queues its
    // reply and writes it on the next read, which then ends the stream: so keep reading
    // rather than drop the socket.
    while let Some(msg) = ws.next().await {
        if let msg @ (Message::Text(_) | Message::Binary(_)) = msg? {
            ws.send(msg).await?;
        }
    }
    Ok(())
}

fn main() {
    let mut port: u16 = 9002;
    let mut verbose = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--port" => {
                let v = it.next().unwrap_or_default();
                port = v.parse().unwrap_or_else(|_| {
                    eprintln!("tungstenite-echo: bad --port {v:?}\n{USAGE}");
                    std::process::exit(2)
                });
            }
            "--verbose" => verbose = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => {
                eprintln!("tungstenite-echo: unknown argument {other:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    let res: std::io::Result<()> = rt.block_on(async move {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        let addr = listener.local_addr()?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening on {addr} (tokio-tungstenite 0.30)")?;
        stdout.flush()?;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tungstenite-echo: accept: {e}");
                    tokio::task::yield_now().await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                if let Err(e) = serve(stream).await
                    && (verbose || !is_disconnect(&e))
                {
                    eprintln!("tungstenite-echo: connection error: {e}");
                }
            });
        }
    });
    if let Err(e) = res {
        eprintln!("tungstenite-echo: {e}");
        std::process::exit(1);
    }
}
