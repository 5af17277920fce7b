//! The demo gears through the gear authors' harness (`testkit`): a real engine with
//! two shards, blocking tungstenite clients.

use std::time::Duration;

use kythera_testkit::TestServer;
use tools::gears::chat::ChatEvent;
use tools::gears::{Chat, Echo};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

#[test]
fn echo_sends_text_as_text_and_binary_as_binary() {
    let server = TestServer::start(|b| b.mount("/echo", Echo));
    let mut client = server.connect("/echo");
    client.send_text("héllo");
    assert_eq!(client.recv_text(), "héllo");
    client.send_binary(&[0, 1, 255]);
    assert_eq!(client.recv_binary(), vec![0, 1, 255]);
    client.expect_silence(Duration::from_millis(100));
    client.close();
}

#[test]
fn chat_by_name_and_by_room() {
    let server = TestServer::start(|b| b.mount("/chat", Chat));
    let mut ann = server.connect("/chat?room=lobby&name=ann");
    let mut bob = server.connect("/chat?room=lobby&name=bob");
    let mut cid = server.connect("/chat?room=attic&name=cid");

    ann.send_text(r#"{"to":"bob","text":"psst"}"#);
    let got = json(&bob.recv_text());
    assert_eq!(got["from"], "ann");
    assert_eq!(got["to"], "bob");
    assert_eq!(got["text"], "psst");

    bob.send_text(r#"{"text":"hello lobby"}"#);
    for client in [&mut ann, &mut bob] {
        let got = json(&client.recv_text());
        assert_eq!(got["from"], "bob");
        assert_eq!(got["room"], "lobby");
        assert!(got["to"].is_null());
    }
    cid.expect_silence(Duration::from_millis(100));

    cid.send_text("not json");
    assert!(json(&cid.recv_text())["error"].is_string());
    cid.send_text(r#"{"to":"nobody","text":"x"}"#);
    assert!(
        json(&cid.recv_text())["error"]
            .as_str()
            .unwrap()
            .contains("nobody")
    );

    // A foreign thread reaches a name through the registry handle.
    let handle = server.registry::<ChatEvent>("/chat");
    assert_eq!(handle.count("room:lobby"), 2);
    handle
        .send_message("cid", ChatEvent(r#"{"from":"ops","text":"hi"}"#.into()))
        .unwrap();
    assert_eq!(json(&cid.recv_text())["from"], "ops");
    ann.close();
    bob.close();
    cid.close();
    server.stop();
}

#[test]
fn chat_refuses_a_taken_name_and_bad_parameters() {
    let server = TestServer::start(|b| b.mount("/chat", Chat));
    let _ann = server.connect("/chat?room=lobby&name=ann");
    let taken = server.try_connect("/chat?room=lobby&name=ann").unwrap_err();
    assert_eq!(taken.status, 409);
    assert!(String::from_utf8_lossy(&taken.body).contains("ann"));
    let missing = server.try_connect("/chat?room=lobby").unwrap_err();
    assert_eq!(missing.status, 400);
}

#[test]
fn drain_closes_clients_with_1001() {
    let server = TestServer::start(|b| b.mount("/echo", Echo));
    let mut client = server.connect("/echo");
    let stopper = std::thread::spawn(move || server.stop());
    let reason = client.expect_close(1001);
    assert!(reason.contains("shutting down"), "{reason}");
    stopper.join().unwrap();
}
