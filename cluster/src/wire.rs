//! Messages between nodes on the wire: one publish carries a batch of them.
//!
//! A batch goes to one channel (a node's, or a group's) and holds every message the
//! sending node had for that channel when its backplane last flushed: one Redis command
//! for many messages. Encoded with postcard: field names and lengths cost nothing
//! beyond a varint, so a 100-byte chat message travels in about 130 bytes with its
//! gear, connection id and the batch's header.

use serde::{Deserialize, Serialize};

/// The kind of a frame published with `publish_frame`.
pub const FRAME_TEXT: u8 = 0;
/// A binary frame.
pub const FRAME_BINARY: u8 = 1;
/// A close frame (`code` 0: without a status).
pub const FRAME_CLOSE: u8 = 2;

/// One message of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Item<'a> {
    /// A server message for one connection of the receiving node.
    To {
        /// The gear's pattern.
        gear: &'a str,
        /// The connection's id on the receiving node.
        conn: u64,
        /// The message, encoded by the gear's codec.
        msg: &'a [u8],
    },
    /// A server message for the receiving node's members of a group.
    Publish {
        /// The gear's pattern.
        gear: &'a str,
        /// The group.
        group: &'a str,
        /// The message, encoded by the gear's codec.
        msg: &'a [u8],
    },
    /// A frame for the receiving node's members of a group.
    Frame {
        /// The gear's pattern.
        gear: &'a str,
        /// The group.
        group: &'a str,
        /// [`FRAME_TEXT`], [`FRAME_BINARY`] or [`FRAME_CLOSE`].
        kind: u8,
        /// A close frame's code.
        code: u16,
        /// The payload (a close frame's reason).
        payload: &'a [u8],
    },
}

/// A batch of messages from one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch<'a> {
    /// The sending node (a node ignores its own publishes to groups: it delivered them
    /// locally already).
    pub from: &'a str,
    /// The messages, in the order they were sent.
    #[serde(borrow)]
    pub items: Vec<Item<'a>>,
}

/// Builds a batch's bytes one message at a time, without holding the messages
/// (their bytes are borrowed from the outbox only while each is written): the items
/// are encoded as they come and the header (`from` and the count) is written in front
/// at the end, which is exactly how postcard encodes a [`Batch`].
#[derive(Debug, Default)]
pub struct BatchWriter {
    count: usize,
    items: Vec<u8>,
}

impl BatchWriter {
    /// Adds a message.
    pub fn push(&mut self, item: &Item<'_>) {
        let items = std::mem::take(&mut self.items);
        self.items = postcard::to_extend(item, items).unwrap_or_default();
        self.count += 1;
    }

    /// How many messages it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The batch's bytes, sent by node `from`.
    pub fn finish(self, from: &str) -> Vec<u8> {
        let mut out = postcard::to_extend(&from, Vec::with_capacity(self.items.len() + 80))
            .unwrap_or_default();
        out = postcard::to_extend(&self.count, out).unwrap_or_default();
        out.extend_from_slice(&self.items);
        out
    }
}

/// Appends the encoded `batch` to `out`.
pub fn encode(batch: &Batch<'_>, out: Vec<u8>) -> Vec<u8> {
    postcard::to_extend(batch, out).unwrap_or_default()
}

/// The batch in `bytes`, borrowing from them.
pub fn decode(bytes: &[u8]) -> Option<Batch<'_>> {
    postcard::from_bytes(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_stay_small() {
        let text = [b'x'; 100];
        let batch = Batch {
            from: "node-a",
            items: vec![
                Item::To {
                    gear: "/chat",
                    conn: 0x0100_0002_0000_0007,
                    msg: &text,
                },
                Item::Publish {
                    gear: "/chat",
                    group: "room:lobby",
                    msg: b"hi",
                },
                Item::Frame {
                    gear: "/chat",
                    group: "g",
                    kind: FRAME_CLOSE,
                    code: 1000,
                    payload: b"bye",
                },
            ],
        };
        let bytes = encode(&batch, Vec::new());
        assert_eq!(decode(&bytes), Some(batch.clone()));
        let one = encode(
            &Batch {
                from: "node-a",
                items: vec![Item::To {
                    gear: "/chat",
                    conn: 0x0100_0002_0000_0007,
                    msg: &text,
                }],
            },
            Vec::new(),
        );
        assert!(one.len() < 130, "{} bytes", one.len());
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);

        let mut w = BatchWriter::default();
        for item in &batch.items {
            w.push(item);
        }
        assert_eq!(w.len(), 3);
        assert_eq!(
            w.finish("node-a"),
            bytes,
            "the writer encodes as postcard does"
        );
    }
}
