//! The registry without I/O: several shards simulated in one thread.

use super::*;

fn encode(frame: &Frame, out: &mut Vec<u8>) {
    // A stand-in for the engine's encoder: opcode byte, then the payload.
    match frame {
        Frame::Text(t) => {
            out.push(0x81);
            out.extend_from_slice(t.as_bytes());
        }
        Frame::Binary(b) => {
            out.push(0x82);
            out.extend_from_slice(b);
        }
        Frame::Close(_) => unreachable!(),
    }
}

struct Sim {
    wakeup: Arc<Wakeup>,
    reg: Registry<String>,
    shards: Vec<ShardRegistry<String>>,
}

fn sim(shards: usize, capacity: usize) -> Sim {
    let wakeup = Arc::new(Wakeup::new(shards));
    let reg = Registry::new(
        RegistryConfig {
            queue_capacity: capacity,
            ..RegistryConfig::default()
        },
        Arc::clone(&wakeup),
        encode,
    );
    let shards = (0..shards).map(|i| reg.shard(i).unwrap()).collect();
    Sim {
        wakeup,
        reg,
        shards,
    }
}

impl Sim {
    /// Everything shard `s` has inbound, as (connection, text) pairs, after every shard
    /// ended its turn (moved its staged messages into the queues).
    fn inbox(&mut self, s: usize) -> Vec<(ConnId, String)> {
        for shard in &mut self.shards {
            shard.take_wakeups(|_| {});
        }
        let mut out = Vec::new();
        self.shards[s].take_inbound(usize::MAX, &mut out);
        out.into_iter()
            .map(|i| match i {
                Inbound::Message(c, m) => (c, m),
                Inbound::Frame(c, f) => {
                    (c, format!("bytes:{}", String::from_utf8_lossy(&f.encoded)))
                }
                Inbound::Close(c, f) => (c, format!("close:{f:?}")),
                Inbound::NameLost(c, n) => (c, format!("lost:{n}")),
                Inbound::NamesDecided(c, lost) => (c, format!("decided:{lost:?}")),
            })
            .collect()
    }

    /// Shards that shard `s` must notify after its turn.
    fn wakeups(&mut self, s: usize) -> Vec<usize> {
        let mut v = Vec::new();
        self.shards[s].take_wakeups(|t| v.push(t));
        v
    }
}

fn conn(shard: u8, seq: u64) -> ConnId {
    ConnId::new(shard, seq)
}

#[test]
fn send_message_crosses_shards_in_order() {
    let mut s = sim(3, 64);
    let (a, b) = (conn(0, 1), conn(2, 7));
    s.shards[2].register(b, "bob").unwrap();
    assert_eq!(s.shards[0].register(a, "bob"), Err(RegistryError::Taken));
    for i in 0..10 {
        assert_eq!(s.shards[0].send_message("bob", format!("m{i}")), Ok(true));
    }
    assert_eq!(s.shards[0].send_message("nobody", "x".into()), Ok(false));
    assert_eq!(
        s.wakeups(0),
        vec![2],
        "one wake-up check per target per turn"
    );
    assert_eq!(s.wakeups(0), Vec::<usize>::new());
    assert!(s.inbox(1).is_empty());
    let got = s.inbox(2);
    assert_eq!(
        got,
        (0..10).map(|i| (b, format!("m{i}"))).collect::<Vec<_>>()
    );
    assert_eq!(s.reg.stats().forwarded, 10);
    assert_eq!(s.reg.stats().received, 10);
}

#[test]
fn to_self_goes_through_the_local_queue() {
    let mut s = sim(2, 64);
    let a = conn(1, 1);
    s.shards[1].register(a, "me").unwrap();
    assert_eq!(s.shards[1].send_message("me", "hi".into()), Ok(true));
    assert!(s.wakeups(1).is_empty(), "no wake-up for itself");
    assert!(s.shards[1].has_inbound());
    assert_eq!(s.inbox(1), vec![(a, "hi".to_owned())]);
    assert!(!s.shards[1].has_inbound());
}

#[test]
fn publish_sends_one_message_per_shard_and_fans_out_locally() {
    let mut s = sim(3, 64);
    let members: Vec<ConnId> = (0..3u8)
        .flat_map(|sh| (0..(sh as u64 + 1)).map(move |i| conn(sh, i)))
        .collect();
    for &m in &members {
        s.shards[usize::from(m.shard())].join(m, "room").unwrap();
    }
    // Joining twice changes nothing.
    s.shards[0].join(conn(0, 0), "room").unwrap();
    assert_eq!(s.shards[1].count("room"), Ok(6));
    let before = s.reg.stats().forwarded;
    assert_eq!(s.shards[0].publish("room", "hello".into()), Ok(6));
    assert_eq!(
        s.reg.stats().forwarded - before,
        2,
        "one per other shard, never one per member"
    );
    for sh in 0..3 {
        let got = s.inbox(sh);
        assert_eq!(got.len(), sh + 1);
        assert!(
            got.iter()
                .all(|(c, m)| usize::from(c.shard()) == sh && m == "hello")
        );
    }
    assert_eq!(s.shards[0].publish("empty", "x".into()), Ok(0));
}

#[test]
fn publish_frame_encodes_once() {
    let mut s = sim(2, 64);
    s.shards[0].join(conn(0, 1), "g").unwrap();
    s.shards[1].join(conn(1, 1), "g").unwrap();
    s.shards[1].join(conn(1, 2), "g").unwrap();
    assert_eq!(s.shards[0].publish_frame("g", Frame::text("hey")), Ok(3));
    assert_eq!(
        s.inbox(0),
        vec![(conn(0, 1), "bytes:\u{81}hey".replace('\u{81}', "\u{fffd}"))]
    );
    let mut raw = Vec::new();
    s.shards[1].take_inbound(usize::MAX, &mut raw);
    let ptrs: Vec<*const u8> = raw
        .iter()
        .map(|i| match i {
            Inbound::Frame(_, f) => f.encoded.as_ptr(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ptrs.len(), 2);
    assert_eq!(ptrs[0], ptrs[1], "the same bytes for every member");
    assert_eq!(s.shards[1].publish_frame("g", Frame::Close(None)), Ok(3));
    assert!(s.inbox(1).iter().all(|(_, m)| m == "close:None"));
}

#[test]
fn leave_and_cleanup() {
    let mut s = sim(2, 64);
    let a = conn(0, 1);
    s.shards[0].register(a, "ann").unwrap();
    s.shards[0].register(a, "ann2").unwrap();
    s.shards[0].join(a, "r1").unwrap();
    s.shards[0].join(a, "r2").unwrap();
    assert_eq!(s.shards[0].leave(a, "r1"), Ok(()));
    assert_eq!(s.shards[0].leave(a, "r1"), Err(RegistryError::NotInGroup));
    assert_eq!(
        s.shards[0].leave(conn(0, 2), "r2"),
        Err(RegistryError::NotInGroup)
    );
    assert_eq!(s.shards[1].count("r1"), Ok(0));
    s.shards[0].unregister(a, "ann2").unwrap();
    assert_eq!(
        s.shards[0].unregister(a, "ann2"),
        Err(RegistryError::NotRegistered)
    );
    s.shards[0].remove_conn(a);
    assert_eq!(s.shards[1].lookup("ann"), Ok(None));
    assert_eq!(s.shards[1].count("r2"), Ok(0));
    assert_eq!(s.reg.stats().names, 0);
    assert_eq!(s.reg.stats().groups, 0);
    // The name is free for another connection at once.
    s.shards[1].register(conn(1, 1), "ann").unwrap();
}

#[test]
fn names_taken_in_connect_are_freed_with_the_connection() {
    let mut s = sim(1, 8);
    let names = s.reg.names();
    let a = conn(0, 3);
    names.register(a, "early").unwrap();
    s.shards[0].adopt_names(a, vec!["early".into()]);
    assert_eq!(s.shards[0].lookup("early"), Ok(Some(a)));
    s.shards[0].remove_conn(a);
    assert_eq!(names.lookup("early"), None);
}

#[test]
fn full_queue_drops_counts_and_says_so() {
    let mut s = sim(2, 4);
    let b = conn(1, 1);
    s.shards[1].register(b, "b").unwrap();
    s.shards[1].join(b, "g").unwrap();
    for _ in 0..4 {
        assert_eq!(s.shards[0].send_message("b", "x".into()), Ok(true));
    }
    assert_eq!(
        s.shards[0].send_message("b", "y".into()),
        Err(RegistryError::Full),
        "full counting what this turn staged"
    );
    s.shards[0].take_wakeups(|_| {});
    assert_eq!(
        s.shards[0].send_message("b", "y".into()),
        Err(RegistryError::Full),
        "still full once in the queue"
    );
    assert_eq!(
        s.shards[0].publish("g", "z".into()),
        Ok(0),
        "nobody reached"
    );
    assert_eq!(s.reg.stats().dropped_full, 3);
    assert_eq!(s.inbox(1).len(), 4);
    assert_eq!(s.shards[0].send_message("b", "again".into()), Ok(true));
    // The local queue has the same bound.
    s.shards[0].register(conn(0, 1), "a").unwrap();
    for _ in 0..4 {
        s.shards[0].send_message("a", "x".into()).unwrap();
    }
    assert_eq!(
        s.shards[0].send_message("a", "x".into()),
        Err(RegistryError::Full)
    );
}

#[test]
fn take_inbound_respects_max() {
    let mut s = sim(2, 64);
    s.shards[1].register(conn(1, 1), "b").unwrap();
    for i in 0..10 {
        s.shards[0].send_message("b", i.to_string()).unwrap();
    }
    s.shards[0].take_wakeups(|_| {});
    let mut out = Vec::new();
    assert_eq!(s.shards[1].take_inbound(4, &mut out), 4);
    assert_eq!(s.shards[1].take_inbound(100, &mut out), 6);
    let texts: Vec<_> = out
        .into_iter()
        .map(|i| match i {
            Inbound::Message(_, m) => m,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(texts, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[test]
fn foreign_handle_sends_publishes_and_wakes() {
    let mut s = sim(2, 64);
    let woken = Arc::new(Mutex::new(Vec::new()));
    let w = Arc::clone(&woken);
    s.wakeup
        .set_foreign_waker(Box::new(move |shard| w.lock().unwrap().push(shard)));
    let b = conn(1, 5);
    s.shards[1].register(b, "b").unwrap();
    s.shards[1].join(b, "g").unwrap();
    s.shards[0].join(conn(0, 1), "g").unwrap();
    let handle = s.reg.handle();
    let h2 = handle.clone();
    std::thread::spawn(move || {
        assert_eq!(h2.send_message("b", "from afar".into()), Ok(true));
        assert_eq!(h2.send_message("nobody", "x".into()), Ok(false));
    })
    .join()
    .unwrap();
    assert!(woken.lock().unwrap().is_empty(), "shard 1 was running");
    assert!(s.wakeup.prepare_sleep(1) || s.wakeup.prepare_sleep(1));
    assert_eq!(handle.publish("g", "all".into()), Ok(2));
    assert_eq!(*woken.lock().unwrap(), vec![1], "shard 1 slept: woken once");
    assert_eq!(handle.count("g"), 2);
    assert_eq!(handle.lookup("b"), Some(b));
    handle.conn(b).send("direct".into()).unwrap();
    s.wakeup.woke(1);
    assert_eq!(
        s.inbox(1),
        vec![
            (b, "from afar".to_owned()),
            (b, "all".to_owned()),
            (b, "direct".to_owned())
        ]
    );
    assert_eq!(s.inbox(0), vec![(conn(0, 1), "all".to_owned())]);
    assert_eq!(s.reg.stats().from_foreign, 4);
}

#[test]
fn conn_handle_reports_full() {
    let s = sim(1, 2);
    let h = s.reg.handle().conn(conn(0, 1));
    h.send("1".into()).unwrap();
    h.send("2".into()).unwrap();
    assert_eq!(h.send("3".into()), Err(DeliverError::Full("3".to_owned())));
    assert_eq!(s.reg.stats().dropped_full, 1);
    let bad = s.reg.handle().conn(conn(9, 1));
    assert_eq!(
        bad.send("x".into()),
        Err(DeliverError::Closed("x".to_owned()))
    );
}

#[test]
fn gears_do_not_share_names_or_groups() {
    let mut a = sim(2, 8);
    let mut b = sim(2, 8);
    a.shards[0].register(conn(0, 1), "x").unwrap();
    a.shards[0].join(conn(0, 1), "g").unwrap();
    assert_eq!(b.shards[0].lookup("x"), Ok(None));
    assert_eq!(b.shards[1].send_message("x", "m".into()), Ok(false));
    assert_eq!(b.shards[1].publish("g", "m".into()), Ok(0));
    b.shards[1].register(conn(1, 1), "x").unwrap();
}

#[test]
fn operations_for_another_shards_connection_are_refused() {
    let mut s = sim(2, 8);
    assert_eq!(
        s.shards[0].register(conn(1, 1), "x"),
        Err(RegistryError::Unavailable)
    );
    assert_eq!(
        s.shards[0].join(conn(1, 1), "g"),
        Err(RegistryError::Unavailable)
    );
}

#[test]
fn each_shard_part_is_handed_out_once() {
    let s = sim(2, 8);
    assert!(s.reg.shard(0).is_none());
    assert!(s.reg.shard(5).is_none());
}

#[test]
fn two_threads_stream_in_order() {
    // The shape of the engine: each shard part on its own thread.
    let wakeup = Arc::new(Wakeup::new(2));
    let reg: Registry<u64> = Registry::new(RegistryConfig::default(), wakeup, |_, _| {});
    let mut s0 = reg.shard(0).unwrap();
    let mut s1 = reg.shard(1).unwrap();
    let target = conn(1, 1);
    s1.register(target, "sink").unwrap();
    const N: u64 = 200_000;
    let sender = std::thread::spawn(move || {
        let mut i = 0;
        while i < N {
            match s0.send_message("sink", i) {
                Ok(true) => i += 1,
                Err(RegistryError::Full) => {
                    s0.take_wakeups(|_| {});
                    std::thread::yield_now();
                }
                other => panic!("{other:?}"),
            }
            // The end of a turn: staged messages go into the queue.
            if i % 64 == 0 {
                s0.take_wakeups(|_| {});
            }
        }
        s0.take_wakeups(|_| {});
        s0
    });
    let mut next = 0;
    let mut out = Vec::new();
    while next < N {
        out.clear();
        s1.take_inbound(1024, &mut out);
        for i in out.drain(..) {
            match i {
                Inbound::Message(c, m) => {
                    assert_eq!(c, target);
                    assert_eq!(m, next, "in order, none lost or doubled");
                    next += 1;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    let _s0 = sender.join().unwrap();
    let stats = reg.stats();
    assert_eq!(stats.received, N);
    assert_eq!(stats.forwarded, N);
}

#[test]
fn conn_handle_answers_closed_after_the_connection_ends() {
    let mut s = sim(2, 8);
    let a = conn(1, 4);
    let h = s.shards[1].handle(a).unwrap();
    let h2 = s.shards[1].handle(a).unwrap();
    h.send("x".into()).unwrap();
    s.shards[1].remove_conn(a);
    assert_eq!(
        h2.send("y".into()),
        Err(DeliverError::Closed("y".to_owned()))
    );
    assert_eq!(s.inbox(1), vec![(a, "x".to_owned())]);
    assert_eq!(
        s.shards[0].handle(a).map(|_| ()),
        Err(RegistryError::Unavailable),
        "only the owning shard hands out a connection's handle"
    );
}

#[test]
fn lookup_cache_follows_a_name_that_changes_holder() {
    let mut s = sim(3, 64);
    let (old, new) = (conn(1, 1), conn(2, 1));
    s.shards[1].register(old, "n").unwrap();
    assert_eq!(s.shards[0].send_message("n", "1".into()), Ok(true));
    assert_eq!(s.shards[0].lookup("n"), Ok(Some(old)));
    s.shards[1].remove_conn(old);
    assert_eq!(
        s.shards[0].lookup("n"),
        Ok(None),
        "not served from the cache"
    );
    assert_eq!(s.shards[0].send_message("n", "2".into()), Ok(false));
    s.shards[2].register(new, "n").unwrap();
    assert_eq!(s.shards[0].send_message("n", "3".into()), Ok(true));
    assert_eq!(s.inbox(1), vec![(old, "1".to_owned())]);
    assert_eq!(s.inbox(2), vec![(new, "3".to_owned())]);
    // Unregistering through the connect-time table moves the count too.
    let names = s.reg.names();
    names.unregister(new, "n").unwrap();
    assert_eq!(s.shards[0].lookup("n"), Ok(None));
}
