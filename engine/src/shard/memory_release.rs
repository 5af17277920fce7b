//! When a shard calls the server's memory-release hook (see [`MemoryRelease`]).

/// How long no connection has opened or closed before a shard calls the release hook.
const RELEASE_QUIET_MS: u64 = 1_000;
/// While connections keep opening or closing, the hook runs at least this often.
const RELEASE_EVERY_MS: u64 = 10_000;

/// When a shard calls the server's memory-release hook
/// ([`crate::ServerBuilder::release_memory`]): once no connection has opened or closed
/// for [`RELEASE_QUIET_MS`] after some did (and every [`RELEASE_EVERY_MS`] while they
/// keep doing so), never while nothing changes.
///
/// Why: a burst of handshakes allocates and frees request, response and session
/// buffers in many size classes, and the allocator keeps what it freed for reuse
/// (mimalloc keeps the last page of each size class and purges freed pages only when
/// it is called again, which an idle shard never does). Measured with 10,000 idle
/// connections: about 230 KiB stayed resident after the handshakes (23 bytes per
/// connection), none once the hook had run (README, "Memory per idle connection").
/// Connections that only exchange messages do not trigger it: what they free they
/// allocate again.
pub(super) struct MemoryRelease {
    hook: Option<fn()>,
    /// The first and the last open or close since the hook last ran.
    churn: Option<(u64, u64)>,
}

impl MemoryRelease {
    pub(super) fn new(hook: Option<fn()>) -> MemoryRelease {
        MemoryRelease { hook, churn: None }
    }

    /// A connection opened or closed.
    pub(super) fn churned(&mut self, now_ms: u64) {
        if self.hook.is_some() {
            let first = self.churn.map_or(now_ms, |(first, _)| first);
            self.churn = Some((first, now_ms));
        }
    }

    /// The hook to call now, if it is due (and then not again until more churn).
    pub(super) fn due(&mut self, now_ms: u64) -> Option<fn()> {
        let (first, last) = self.churn?;
        let quiet = now_ms.saturating_sub(last) >= RELEASE_QUIET_MS;
        let overdue = now_ms.saturating_sub(first) >= RELEASE_EVERY_MS;
        if !(quiet || overdue) {
            return None;
        }
        self.churn = None;
        self.hook
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_released_after_churn_once_quiet() {
        fn hook() {}
        let mut r = MemoryRelease::new(Some(hook));
        assert!(r.due(5_000).is_none(), "nothing opened or closed yet");
        r.churned(1_000);
        r.churned(1_500);
        assert!(r.due(2_499).is_none(), "not quiet for a second yet");
        assert!(r.due(2_500).is_some());
        assert!(r.due(9_000).is_none(), "once per burst");
        // Steady churn: every RELEASE_EVERY_MS at least.
        let mut t = 10_000;
        let mut calls = 0;
        while t < 40_000 {
            r.churned(t);
            if r.due(t).is_some() {
                calls += 1;
            }
            t += 500;
        }
        assert_eq!(calls, 2, "released at 20 s and 30.5 s");
        let mut none = MemoryRelease::new(None);
        none.churned(0);
        assert!(none.due(60_000).is_none());
    }
}
