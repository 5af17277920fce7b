//! Waking a shard that may be asleep, only when it may be asleep.
//!
//! Each shard has one state word, shared by every gear's queues towards it:
//!
//! ```text
//! RUNNING  --prepare_sleep (CAS)-->  SLEEPING  --woke-->  RUNNING
//!    |                                  |
//!    +--notify (swap)--> NOTIFIED <-----+ notify: the swap saw SLEEPING, so the
//!                          |              caller must wake the shard (MSG_RING or eventfd)
//!                          +--prepare_sleep fails, woke--> RUNNING
//! ```
//!
//! A sender first pushes its messages, then calls [`Wakeup::notify`] once per target
//! shard (once per loop turn for a shard, once per call for a foreign thread). A shard
//! that is about to block first drains its queues, then calls
//! [`Wakeup::prepare_sleep`]; if a sender notified it meanwhile, the call fails and the
//! shard turns again instead of blocking. Every transition is a read-modify-write of the
//! same word, so they are totally ordered: either the sender's swap comes before the
//! shard's compare-exchange (which then fails, and the acquire makes the pushed
//! messages visible), or after it (the swap sees `SLEEPING` and the sender wakes the
//! shard). No wake-up is lost and none is sent to a running shard. The `loom` model in
//! this file checks exactly that.

use std::fmt;
use std::sync::OnceLock;

use crossbeam_utils::CachePadded;

#[cfg(loom)]
use loom::sync::atomic::{AtomicU8, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU8, Ordering};

const RUNNING: u8 = 0;
const SLEEPING: u8 = 1;
const NOTIFIED: u8 = 2;

/// How a foreign thread wakes a shard (the engine writes to the shard's eventfd).
pub type ForeignWaker = Box<dyn Fn(usize) + Send + Sync>;

/// The sleep state of every shard, shared by all gears' registries of one engine.
pub struct Wakeup {
    states: Box<[CachePadded<AtomicU8>]>,
    foreign: OnceLock<ForeignWaker>,
}

impl fmt::Debug for Wakeup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wakeup")
            .field("shards", &self.states.len())
            .finish_non_exhaustive()
    }
}

impl Wakeup {
    /// States for `shards` shards, all running.
    pub fn new(shards: usize) -> Wakeup {
        Wakeup {
            states: (0..shards)
                .map(|_| CachePadded::new(AtomicU8::new(RUNNING)))
                .collect(),
            foreign: OnceLock::new(),
        }
    }

    /// How many shards.
    pub fn shards(&self) -> usize {
        self.states.len()
    }

    /// Installs how foreign threads wake a shard. Only the first call counts.
    pub fn set_foreign_waker(&self, waker: ForeignWaker) {
        let _ = self.foreign.set(waker);
    }

    /// Called by a sender after pushing to `shard`'s queues: `true` when the shard may
    /// be blocked and must be woken by the caller.
    pub fn notify(&self, shard: usize) -> bool {
        // Always a swap, never a load that skips when NOTIFIED is already there: only
        // a read-modify-write puts this sender's pushes into the release sequence that
        // the shard's next acquiring RMW (`prepare_sleep` or `woke`) synchronises with.
        self.states[shard].swap(NOTIFIED, Ordering::AcqRel) == SLEEPING
    }

    /// Wakes `shard` from a foreign thread if it may be blocked.
    pub fn notify_from_foreign(&self, shard: usize) {
        if self.notify(shard)
            && let Some(wake) = self.foreign.get()
        {
            wake(shard);
        }
    }

    /// Called by `shard` after draining its queues, before blocking: `true` if it may
    /// block; `false` if a sender notified it meanwhile (the shard is running again and
    /// must drain before trying to sleep).
    pub fn prepare_sleep(&self, shard: usize) -> bool {
        let state = &self.states[shard];
        match state.compare_exchange(RUNNING, SLEEPING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(_) => {
                // NOTIFIED: consume it with an acquiring RMW so that what the
                // notifiers pushed is visible to the drain that follows.
                state.swap(RUNNING, Ordering::AcqRel);
                false
            }
        }
    }

    /// [`Wakeup::prepare_sleep`] with the bug the loom models must catch: a load and a
    /// plain store instead of one compare-exchange, so a notify can fall between them.
    #[cfg(all(test, loom))]
    fn prepare_sleep_with_plain_store(&self, shard: usize) -> bool {
        let state = &self.states[shard];
        if state.load(Ordering::Acquire) == RUNNING {
            state.store(SLEEPING, Ordering::Release);
            true
        } else {
            state.swap(RUNNING, Ordering::AcqRel);
            false
        }
    }

    /// Called by `shard` when it stops blocking (woken or timed out).
    pub fn woke(&self, shard: usize) {
        self.states[shard].swap(RUNNING, Ordering::AcqRel);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicBool;
    use loom::thread;

    /// A sender pushes one message (a flag standing for the queue) and notifies; the
    /// shard drains, then tries to sleep. In every interleaving, a shard that went to
    /// sleep without having seen the message must have been woken.
    #[test]
    fn no_lost_wakeup() {
        lost_wakeup_model(Wakeup::prepare_sleep);
    }

    /// The model catches the bug it is there for: with a plain store in place of the
    /// compare-exchange, some interleaving sleeps with the message queued and no
    /// wake-up coming (checks that the model is not vacuous).
    #[test]
    #[should_panic(expected = "asleep with a message queued and no wake-up")]
    fn a_plain_store_loses_a_wakeup() {
        lost_wakeup_model(Wakeup::prepare_sleep_with_plain_store);
    }

    fn lost_wakeup_model(prepare_sleep: fn(&Wakeup, usize) -> bool) {
        loom::model(move || {
            let wakeup = Arc::new(Wakeup::new(1));
            let queued = Arc::new(AtomicBool::new(false));
            let sender = {
                let (wakeup, queued) = (Arc::clone(&wakeup), Arc::clone(&queued));
                thread::spawn(move || {
                    queued.store(true, Ordering::Release);
                    wakeup.notify(0)
                })
            };
            let mut seen = queued.load(Ordering::Acquire);
            let slept = if prepare_sleep(&wakeup, 0) {
                true
            } else {
                seen |= queued.load(Ordering::Acquire);
                false
            };
            let woken = sender.join().unwrap();
            if slept {
                assert!(seen || woken, "asleep with a message queued and no wake-up");
            } else {
                assert!(seen, "did not sleep, yet the drain missed the message");
                assert!(!woken, "woke a shard that was running");
            }
        });
    }

    /// Two senders, and a shard that blocks for real (on a condition variable) when
    /// `prepare_sleep` lets it, until a sender that saw it asleep wakes it. A lost
    /// wake-up leaves the shard blocked with every sender finished: loom reports the
    /// deadlock.
    #[test]
    fn blocked_shard_is_always_woken() {
        // Bounded preemptions keep the run to seconds; lost wake-ups in this protocol
        // need at most two.
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let wakeup = Arc::new(Wakeup::new(1));
            let queued = Arc::new(loom::sync::atomic::AtomicUsize::new(0));
            let bell = Arc::new((loom::sync::Mutex::new(false), loom::sync::Condvar::new()));
            let senders: Vec<_> = (0..2)
                .map(|_| {
                    let (wakeup, queued, bell) =
                        (Arc::clone(&wakeup), Arc::clone(&queued), Arc::clone(&bell));
                    thread::spawn(move || {
                        queued.fetch_add(1, Ordering::Release);
                        if wakeup.notify(0) {
                            *bell.0.lock().unwrap() = true;
                            bell.1.notify_one();
                        }
                    })
                })
                .collect();
            while queued.load(Ordering::Acquire) < 2 {
                if wakeup.prepare_sleep(0) {
                    let mut rung = bell.0.lock().unwrap();
                    while !*rung {
                        rung = bell.1.wait(rung).unwrap();
                    }
                    *rung = false;
                    drop(rung);
                    wakeup.woke(0);
                }
            }
            for s in senders {
                s.join().unwrap();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakes_only_a_sleeping_shard() {
        let w = Wakeup::new(2);
        assert!(!w.notify(0), "running: no wake-up");
        assert!(!w.prepare_sleep(0), "notified meanwhile: turn again");
        assert!(w.prepare_sleep(0));
        assert!(w.notify(0), "asleep: wake it");
        assert!(!w.notify(0), "already woken once");
        w.woke(0);
        assert!(w.prepare_sleep(1));
        assert!(!w.notify(0));
    }

    #[test]
    fn foreign_waker_runs_only_for_a_sleeping_shard() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let w = Wakeup::new(1);
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        w.set_foreign_waker(Box::new(move |_| {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }));
        w.notify_from_foreign(0);
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(!w.prepare_sleep(0));
        assert!(w.prepare_sleep(0));
        w.notify_from_foreign(0);
        w.notify_from_foreign(0);
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
