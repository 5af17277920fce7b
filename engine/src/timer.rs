//! A hashed timer wheel: the shard's timers (connection deadlines, accept back-off)
//! without a heap and without cancellation.
//!
//! Time is cut into ticks of `tick_ms`; an entry due at `deadline_ms` goes into the slot
//! of the first tick that starts at or after its deadline, modulo the number of slots.
//! [`TimerWheel::advance`] visits the slots of the ticks that have begun since the last
//! call and hands out the entries whose tick has come; entries of a later round (more
//! than `slots * tick_ms` away) stay in their slot until then. So an entry never fires
//! before its deadline, and at most one tick after it (plus however late `advance` is
//! called).
//!
//! There is no cancel: the caller checks, when an entry fires, whether it still means
//! anything (a generation that no longer matches, a deadline that moved later) and
//! inserts a new entry when needed. This keeps the hot path (a deadline pushed back by
//! every received message) free of any wheel operation.

/// The default tick: the shard loop wakes at least this often.
pub const DEFAULT_TICK_MS: u64 = 64;
/// The default number of slots: 1024 ticks of 64 ms is a round of 65.5 s, longer than
/// the default idle timeout, so most entries fire on their first visit.
pub const DEFAULT_SLOTS: usize = 1024;

/// One scheduled timer: when, and the caller's key for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<K> {
    /// The time at which the entry is due, in milliseconds.
    pub deadline_ms: u64,
    /// What the caller wants back (a connection slot and generation, say).
    pub key: K,
}

/// A hashed timer wheel of entries keyed by `K`. See the module docs.
#[derive(Debug)]
pub struct TimerWheel<K> {
    tick_ms: u64,
    slots: Vec<Vec<Entry<K>>>,
    /// The last tick whose slot has been visited; every entry due in it or before has
    /// fired.
    done_tick: u64,
    len: usize,
}

impl<K: Copy> TimerWheel<K> {
    /// A wheel of `slots` slots of `tick_ms` each, whose ticks up to `now_ms` count as
    /// done.
    ///
    /// # Panics
    ///
    /// If `tick_ms` or `slots` is 0.
    pub fn new(tick_ms: u64, slots: usize, now_ms: u64) -> TimerWheel<K> {
        assert!(tick_ms > 0, "a tick must last at least 1 ms");
        assert!(slots > 0, "a wheel needs at least one slot");
        TimerWheel {
            tick_ms,
            slots: (0..slots).map(|_| Vec::new()).collect(),
            done_tick: now_ms / tick_ms,
            len: 0,
        }
    }

    /// The length of a tick in milliseconds.
    pub fn tick_ms(&self) -> u64 {
        self.tick_ms
    }

    /// How many entries are scheduled (fired entries are no longer counted).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no entry is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `key` for `deadline_ms`. A deadline that has passed fires at the next
    /// [`TimerWheel::advance`] that starts a new tick.
    pub fn insert(&mut self, deadline_ms: u64, key: K) {
        let tick = self.due_tick(deadline_ms);
        let slot = self.slot_of(tick);
        self.slots[slot].push(Entry { deadline_ms, key });
        self.len += 1;
    }

    /// Moves every entry due by `now_ms` (as far as whole ticks go) into `fired`, in no
    /// particular order, and returns how many.
    pub fn advance(&mut self, now_ms: u64, fired: &mut Vec<Entry<K>>) -> usize {
        let now_tick = now_ms / self.tick_ms;
        if now_tick <= self.done_tick {
            return 0;
        }
        let before = fired.len();
        // After a long pause every slot is visited once, not once per missed tick.
        let visits = (now_tick - self.done_tick).min(self.slots.len() as u64);
        let tick_ms = self.tick_ms;
        for tick in (now_tick + 1 - visits)..=now_tick {
            let slot = self.slot_of(tick);
            let entries = &mut self.slots[slot];
            let mut i = 0;
            while i < entries.len() {
                if Self::tick_of(tick_ms, entries[i].deadline_ms) <= now_tick {
                    fired.push(entries.swap_remove(i));
                } else {
                    i += 1;
                }
            }
        }
        self.done_tick = now_tick;
        let count = fired.len() - before;
        self.len -= count;
        count
    }

    /// Milliseconds from `now_ms` until the next tick begins (at least 1): how long the
    /// loop may sleep before [`TimerWheel::advance`] can fire anything new.
    pub fn until_next_tick_ms(&self, now_ms: u64) -> u64 {
        let next = (now_ms / self.tick_ms + 1) * self.tick_ms;
        (next - now_ms).max(1)
    }

    /// The first tick that starts at or after `deadline_ms`: firing then never fires
    /// early.
    fn tick_of(tick_ms: u64, deadline_ms: u64) -> u64 {
        deadline_ms.div_ceil(tick_ms)
    }

    /// The tick whose visit fires an entry due at `deadline_ms`: its own, or the next
    /// one to be visited if that has passed.
    fn due_tick(&self, deadline_ms: u64) -> u64 {
        Self::tick_of(self.tick_ms, deadline_ms).max(self.done_tick + 1)
    }

    fn slot_of(&self, tick: u64) -> usize {
        (tick % self.slots.len() as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fire(wheel: &mut TimerWheel<u32>, now_ms: u64) -> Vec<(u64, u32)> {
        let mut fired = Vec::new();
        wheel.advance(now_ms, &mut fired);
        let mut out: Vec<_> = fired.iter().map(|e| (e.deadline_ms, e.key)).collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn fires_at_the_first_tick_at_or_after_the_deadline() {
        let mut wheel = TimerWheel::new(64, 16, 0);
        wheel.insert(100, 1);
        assert_eq!(wheel.len(), 1);
        assert_eq!(fire(&mut wheel, 99), vec![]);
        // 100 lies in tick 1 (64..128): firing at tick 1 would be early.
        assert_eq!(fire(&mut wheel, 127), vec![]);
        assert_eq!(fire(&mut wheel, 128), vec![(100, 1)]);
        assert!(wheel.is_empty());
        assert_eq!(fire(&mut wheel, 1000), vec![]);
    }

    #[test]
    fn a_deadline_on_a_tick_boundary_fires_on_that_tick() {
        let mut wheel = TimerWheel::new(64, 16, 0);
        wheel.insert(128, 7);
        assert_eq!(fire(&mut wheel, 127), vec![]);
        assert_eq!(fire(&mut wheel, 128), vec![(128, 7)]);
    }

    #[test]
    fn never_early_at_most_one_tick_late() {
        let tick = 10;
        let mut wheel = TimerWheel::new(tick, 8, 0);
        for d in 0..200u64 {
            wheel.insert(d, d as u32);
        }
        let mut now = 0;
        let mut seen = 0;
        while now <= 400 {
            for (deadline, _) in fire(&mut wheel, now) {
                assert!(deadline <= now, "fired {deadline} early at {now}");
                assert!(now <= deadline + tick, "fired {deadline} late at {now}");
                seen += 1;
            }
            now += 1;
        }
        assert_eq!(seen, 200);
    }

    #[test]
    fn past_deadlines_fire_at_the_next_tick() {
        let mut wheel = TimerWheel::new(64, 16, 1000);
        wheel.insert(5, 1);
        wheel.insert(1000, 2);
        // Tick 15 (960..1024) is done already: nothing until tick 16 begins.
        assert_eq!(fire(&mut wheel, 1023), vec![]);
        assert_eq!(fire(&mut wheel, 1024), vec![(5, 1), (1000, 2)]);
    }

    #[test]
    fn later_rounds_stay_until_their_turn() {
        // 4 slots of 10 ms: a round is 40 ms.
        let mut wheel = TimerWheel::new(10, 4, 0);
        wheel.insert(20, 1); // tick 2, slot 2
        wheel.insert(60, 2); // tick 6, slot 2 as well, next round
        wheel.insert(100, 3); // tick 10, slot 2, the round after
        assert_eq!(fire(&mut wheel, 25), vec![(20, 1)]);
        assert_eq!(fire(&mut wheel, 59), vec![]);
        assert_eq!(fire(&mut wheel, 60), vec![(60, 2)]);
        assert_eq!(wheel.len(), 1);
        assert_eq!(fire(&mut wheel, 100), vec![(100, 3)]);
    }

    #[test]
    fn a_long_pause_visits_every_slot_once() {
        let mut wheel = TimerWheel::new(10, 4, 0);
        for d in [5, 15, 25, 35, 45, 1000] {
            wheel.insert(d, d as u32);
        }
        // A million ticks later: everything but nothing fires twice.
        let fired = fire(&mut wheel, 10_000_000);
        assert_eq!(fired.len(), 6);
        assert!(wheel.is_empty());
        wheel.insert(10_000_005, 9);
        assert_eq!(fire(&mut wheel, 10_000_009), vec![]);
        assert_eq!(fire(&mut wheel, 10_000_010), vec![(10_000_005, 9)]);
    }

    #[test]
    fn reinserting_a_later_deadline_models_lazy_cancellation() {
        // The shard's pattern: an entry fires, the connection's deadline moved later,
        // so a new entry goes in; the old one is never removed.
        let mut wheel = TimerWheel::new(64, 1024, 0);
        let mut deadline = 60_000;
        wheel.insert(deadline, 1);
        deadline = 90_000; // data arrived at 30 s
        let mut now = 0;
        let mut fired_at = Vec::new();
        while now < 100_000 {
            now += 64;
            for (d, key) in fire(&mut wheel, now) {
                if d < deadline {
                    wheel.insert(deadline, key);
                } else {
                    fired_at.push(now);
                }
            }
        }
        assert_eq!(fired_at.len(), 1);
        assert!(fired_at[0] >= 90_000 && fired_at[0] < 90_000 + 64);
    }

    #[test]
    fn until_next_tick() {
        let wheel: TimerWheel<u32> = TimerWheel::new(64, 4, 0);
        assert_eq!(wheel.until_next_tick_ms(0), 64);
        assert_eq!(wheel.until_next_tick_ms(63), 1);
        assert_eq!(wheel.until_next_tick_ms(64), 64);
        assert_eq!(wheel.until_next_tick_ms(100), 28);
    }

    #[test]
    #[should_panic(expected = "at least 1 ms")]
    fn zero_tick_is_refused() {
        let _ = TimerWheel::<u32>::new(0, 4, 0);
    }
}
