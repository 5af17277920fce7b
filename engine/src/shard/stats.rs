//! A shard's counters: written by its thread only (relaxed atomics, through
//! [`crate::driver::bump`]), readable from any thread for `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

/// A shard's counters, written by its thread only (relaxed atomics), readable from any
/// thread.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub(crate) accepted: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) accept_errors: AtomicU64,
    pub(crate) accept_backoffs: AtomicU64,
    pub(crate) enobufs: AtomicU64,
    pub(crate) recv_rearms: AtomicU64,
    pub(crate) memory_releases: AtomicU64,
    pub(crate) vectored_sends: AtomicU64,
    pub(crate) partial_sends: AtomicU64,
    pub(crate) zero_copy_notifications: AtomicU64,
    pub(crate) forced_closes: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) loop_iterations: AtomicU64,
    pub(crate) submissions: AtomicU64,
    pub(crate) registry_in: AtomicU64,
    pub(crate) wakeups_sent: AtomicU64,
    pub(crate) wakeups_received: AtomicU64,
    /// Registry envelopes waiting when the shard last looked (a gauge).
    pub(crate) registry_depth: AtomicU64,
    pub(crate) tls_handshakes: AtomicU64,
    pub(crate) tls_failed_not_tls: AtomicU64,
    pub(crate) tls_failed_refused: AtomicU64,
    pub(crate) tls_failed_protocol: AtomicU64,
    pub(crate) tls_failed_incomplete: AtomicU64,
    pub(crate) handover_moved: AtomicU64,
    pub(crate) handover_closed: AtomicU64,
    pub(crate) handover_taken: AtomicU64,
    pub(crate) handover_refused: AtomicU64,
    pub(crate) handover_failed: AtomicU64,
}

/// A snapshot of a shard's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardCounters {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections whose socket close completed.
    pub closed: u64,
    /// Accept completions with an error.
    pub accept_errors: u64,
    /// Accepts put off for lack of descriptors or memory.
    pub accept_backoffs: u64,
    /// Recvs that ended because the buffer ring was empty.
    pub enobufs: u64,
    /// Multishot recvs armed again after they ended.
    pub recv_rearms: u64,
    /// Calls of the server's memory-release hook ([`crate::ServerBuilder::release_memory`]).
    pub memory_releases: u64,
    /// Sends that sent less than asked and were continued.
    pub partial_sends: u64,
    /// Outputs queued in several buffers, sent with `sendmsg` (counted once, however
    /// many submissions they took).
    pub vectored_sends: u64,
    /// Zero-copy send notifications received (sends whose pages the kernel released).
    pub zero_copy_notifications: u64,
    /// Connections shut down without waiting any longer for their sends (a peer that
    /// stopped reading, or the end of a drain).
    pub forced_closes: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Turns of the loop.
    pub loop_iterations: u64,
    /// Operations submitted.
    pub submissions: u64,
    /// Registry envelopes taken from this shard's inbound queues.
    pub registry_in: u64,
    /// `MSG_RING` wake-ups sent to other shards.
    pub wakeups_sent: u64,
    /// Wake-ups received (from other shards or from foreign threads' eventfd writes).
    pub wakeups_received: u64,
    /// Connections running a gear now (upgraded, `terminate` not run yet), all gears.
    pub websockets: u64,
    /// Data messages received from clients, all gears.
    pub frames_in: u64,
    /// Frames sent to clients, all gears.
    pub frames_out: u64,
    /// TLS handshakes completed.
    pub tls_handshakes: u64,
    /// TLS connections whose first bytes were not TLS (a plain HTTP request gets 400).
    pub tls_failed_not_tls: u64,
    /// TLS handshakes the client ended with an alert (it refused the certificate, say).
    pub tls_failed_refused: u64,
    /// TLS connections rustls failed otherwise (malformed records, nothing in common).
    pub tls_failed_protocol: u64,
    /// TLS connections closed before their handshake completed (the handshake timeout,
    /// or a client that left).
    pub tls_failed_incomplete: u64,
    /// Handover, old process: connections handed to the new process.
    pub handover_moved: u64,
    /// Handover, old process: connections closed with 1001 instead (their gear does
    /// not opt in, TLS, permessage-deflate with context takeover, or the deadline).
    pub handover_closed: u64,
    /// Handover, new process: connections taken over.
    pub handover_taken: u64,
    /// Handover, new process: connections whose state this build refused (gear not
    /// mounted here, full, or `thaw` said no); the old process closes them with 1001.
    pub handover_refused: u64,
    /// Handover, new process: sockets that could not be adopted; the old process
    /// closes them with 1001.
    pub handover_failed: u64,
}

impl ShardCounters {
    /// Connections accepted and not yet closed.
    pub fn open(&self) -> u64 {
        self.accepted.saturating_sub(self.closed)
    }
}

impl ShardStats {
    /// Registry envelopes waiting in the shard's inbound queues when it last looked.
    pub(crate) fn registry_depth(&self) -> u64 {
        self.registry_depth.load(Ordering::Relaxed)
    }

    /// The counters now.
    pub fn snapshot(&self) -> ShardCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ShardCounters {
            accepted: get(&self.accepted),
            closed: get(&self.closed),
            accept_errors: get(&self.accept_errors),
            accept_backoffs: get(&self.accept_backoffs),
            enobufs: get(&self.enobufs),
            recv_rearms: get(&self.recv_rearms),
            memory_releases: get(&self.memory_releases),
            vectored_sends: get(&self.vectored_sends),
            partial_sends: get(&self.partial_sends),
            zero_copy_notifications: get(&self.zero_copy_notifications),
            forced_closes: get(&self.forced_closes),
            bytes_received: get(&self.bytes_received),
            bytes_sent: get(&self.bytes_sent),
            loop_iterations: get(&self.loop_iterations),
            submissions: get(&self.submissions),
            registry_in: get(&self.registry_in),
            wakeups_sent: get(&self.wakeups_sent),
            wakeups_received: get(&self.wakeups_received),
            // Gear figures are kept per gear; `ServerHandle::stats` adds them.
            websockets: 0,
            frames_in: 0,
            frames_out: 0,
            tls_handshakes: get(&self.tls_handshakes),
            tls_failed_not_tls: get(&self.tls_failed_not_tls),
            tls_failed_refused: get(&self.tls_failed_refused),
            tls_failed_protocol: get(&self.tls_failed_protocol),
            tls_failed_incomplete: get(&self.tls_failed_incomplete),
            handover_moved: get(&self.handover_moved),
            handover_closed: get(&self.handover_closed),
            handover_taken: get(&self.handover_taken),
            handover_refused: get(&self.handover_refused),
            handover_failed: get(&self.handover_failed),
        }
    }
}
