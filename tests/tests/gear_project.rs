//! The README's gear project, built from nothing: its `Cargo.toml` and `src/main.rs` are
//! read out of README.md, written to a temporary directory with the `kythera`
//! dependency pointed at this workspace by path, built with cargo, run on a free port,
//! and talked to. So the instructions a new user follows cannot rot.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tungstenite::Message;

/// The workspace root (this crate is `tests/`).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// The fenced block that follows the README comment `<!-- gear-project: NAME ...-->`.
fn readme_block(readme: &str, name: &str) -> String {
    let marker = format!("<!-- gear-project: {name}");
    let at = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no `{marker}` block"));
    let rest = &readme[at..];
    let open = rest.find("```").expect("a fenced block after the marker");
    let body = &rest[open..];
    let body = &body[body.find('\n').expect("the fence's line ends") + 1..];
    let close = body.find("\n```").expect("the fenced block is closed");
    body[..=close].to_string()
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn readme_gear_project_builds_and_serves() {
    let root = workspace();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let manifest = readme_block(&readme, "Cargo.toml");
    let main_rs = readme_block(&readme, "src/main.rs");

    // The published dependency line, as a user would write it, becomes a path to this
    // workspace's facade crate (the crates are not on crates.io yet).
    let dependency = "kythera = \"0.1\"";
    assert!(
        manifest.contains(dependency),
        "the README's Cargo.toml depends on `{dependency}`"
    );
    let facade = root.join("kythera");
    let manifest = manifest.replace(
        dependency,
        &format!("kythera = {{ path = {:?} }}", facade.display().to_string()),
    );

    let dir =
        TempDir(std::env::temp_dir().join(format!("kythera-gear-project-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(dir.0.join("src")).expect("create the project");
    std::fs::write(dir.0.join("Cargo.toml"), manifest).expect("write Cargo.toml");
    std::fs::write(dir.0.join("src/main.rs"), main_rs).expect("write src/main.rs");
    // The workspace's lock file: the same dependency versions, none fetched anew.
    std::fs::copy(root.join("Cargo.lock"), dir.0.join("Cargo.lock")).expect("copy Cargo.lock");

    // A target directory of its own (not the workspace's, which the running
    // `cargo test` may hold), kept between runs so that the second run is quick.
    let target = root.join("target/gear-project");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--offline"])
        .current_dir(&dir.0)
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("run cargo");
    assert!(status.success(), "the README's gear project did not build");

    let mut child = Command::new(target.join("debug/hello-gear"))
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start hello-gear");
    let stdout = child.stdout.take().expect("stdout");
    let server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the banner");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected banner {line:?}"))
        .to_string();

    let (mut ws, _) = tungstenite::connect(&url).expect("connect to hello-gear");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    assert_eq!(ws.read().expect("greeting"), Message::text("hello"));
    for (n, text) in [(1, "abc"), (2, "kythera")] {
        ws.send(Message::text(text)).expect("send");
        let want = format!("{n}: {}", text.to_uppercase());
        assert_eq!(ws.read().expect("answer"), Message::text(want));
    }
    ws.send(Message::binary(vec![1, 2, 3]))
        .expect("send binary");
    match ws.read().expect("the close") {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1003),
        other => panic!("expected close 1003, got {other:?}"),
    }
    drop(server);
}
