//! Mounts the `Shout` gear on `/shout` at ws://127.0.0.1:8090: a main of a few lines.
//! It runs until the process is stopped (Ctrl-C ends it at once; `tools/src/bin/
//! kythera.rs` shows how to drain on SIGTERM instead).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = kythera_engine::Server::builder()
        .listen("127.0.0.1:8090".parse()?)
        .mount("/shout", shout::Shout)
        .build()?;
    println!("shout on ws://127.0.0.1:8090/shout");
    server.run()?;
    Ok(())
}
