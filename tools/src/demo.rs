//! The demo page `kythera` serves at `GET /`: a chat over the chat gear and the
//! server's live per-shard figures from the stats gear, as static files embedded in the
//! binary (`tools/demo/`), so the binary needs nothing beside it.

/// The page's files as the engine's static-file table takes them: path, content type,
/// body.
pub fn files() -> Vec<(String, &'static str, &'static [u8])> {
    const HTML: &str = "text/html; charset=utf-8";
    let index: &'static [u8] = include_bytes!("../demo/index.html");
    vec![
        ("/".to_owned(), HTML, index),
        ("/index.html".to_owned(), HTML, index),
        (
            "/demo/app.js".to_owned(),
            "text/javascript; charset=utf-8",
            include_bytes!("../demo/app.js"),
        ),
        (
            "/demo/style.css".to_owned(),
            "text/css; charset=utf-8",
            include_bytes!("../demo/style.css"),
        ),
    ]
}
