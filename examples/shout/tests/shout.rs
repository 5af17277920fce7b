//! `Shout` in a real engine, through the testkit harness.

use std::time::Duration;

use kythera_testkit::TestServer;

#[test]
fn shouts_reach_everyone_and_whispers_one() {
    let server = TestServer::start(|b| b.mount("/shout", shout::Shout));
    let mut ann = server.connect("/shout?nick=ann");
    assert_eq!(ann.recv_text(), "welcome, ann");
    let mut bob = server.connect("/shout?nick=bob");
    assert_eq!(bob.recv_text(), "welcome, bob");

    ann.send_text("hello");
    assert_eq!(ann.recv_text(), "ann: hello");
    assert_eq!(bob.recv_text(), "ann: hello");

    bob.send_text("/whisper ann psst");
    assert_eq!(ann.recv_text(), "bob whispers: psst");
    bob.expect_silence(Duration::from_millis(100));

    bob.send_text("/nick ann");
    assert!(bob.recv_text().starts_with("cannot be ann"));
    bob.send_text("/nick bea");
    assert_eq!(bob.recv_text(), "you are bea");
    ann.send_text("/whisper bob hi");
    assert_eq!(ann.recv_text(), "nobody is called bob");
    ann.close();
    bob.close();
}

#[test]
fn a_taken_nick_is_refused_with_409() {
    let server = TestServer::start(|b| b.mount("/shout", shout::Shout));
    let _ann = server.connect("/shout?nick=ann");
    let refused = server.try_connect("/shout?nick=ann").unwrap_err();
    assert_eq!(refused.status, 409);
}
