//! Publishes relayed to another process while a live handover is under way.
//!
//! During a handover a group's members are split between the old process and the new
//! one: those already moved are members in the new process's registry, the others
//! still in the old one's. A `publish_frame` on either side is therefore also handed to
//! a [`RelaySink`], which carries it to the other process; there it is published to
//! the local members only ([`crate::Registry::publish_relayed`]), never relayed back.
//! Typed `publish` messages cannot cross (a gear's message type has no wire form unless
//! it is clustered): while relaying they are counted as not relayed, as are frames the
//! sink could not take.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kythera_handler_api::Frame;

/// Where a gear's registry hands the frames published while relaying.
pub trait RelaySink: Send + Sync {
    /// `frame` was published to `group` in this process; false if it could not be
    /// relayed (too large for the handover socket, the other side full or gone).
    fn frame(&self, group: &str, frame: &Frame) -> bool;
}

/// A gear's relay: off (one relaxed load per publish) unless a sink is set.
#[derive(Default)]
pub(crate) struct Relay {
    on: AtomicBool,
    sink: Mutex<Option<Arc<dyn RelaySink>>>,
    pub(crate) relayed: AtomicU64,
    pub(crate) unrelayed: AtomicU64,
}

impl Relay {
    pub(crate) fn set(&self, sink: Option<Arc<dyn RelaySink>>) {
        if let Ok(mut s) = self.sink.lock() {
            self.on.store(sink.is_some(), Ordering::Release);
            *s = sink;
        }
    }

    /// Hands `frame` to the sink, if relaying.
    pub(crate) fn frame(&self, group: &str, frame: &Frame) {
        if !self.on.load(Ordering::Acquire) {
            return;
        }
        let sink = self.sink.lock().ok().and_then(|s| s.clone());
        if let Some(sink) = sink {
            let counter = if sink.frame(group, frame) {
                &self.relayed
            } else {
                &self.unrelayed
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A typed publish while relaying: it reaches this process's members only (counted
    /// as not relayed).
    pub(crate) fn message(&self) {
        if self.on.load(Ordering::Acquire) {
            self.unrelayed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
