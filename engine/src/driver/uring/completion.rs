//! Reading completions: the user_data encoding and the flags of multishot operations.
//!
//! Every operation the engine submits carries a [`UserData`]: what kind of operation it
//! is ([`Op`]), the index of the connection (or other slot) it belongs to, and a 24-bit
//! tag the caller may use as a generation, all in one `u64`:
//!
//! ```text
//! bits 63..56  op kind
//! bits 55..32  tag (24 bits)
//! bits 31..0   index
//! ```

use io_uring::cqueue;

/// The kind of an operation, stored in the top byte of its user_data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Multishot accept on a listener.
    Accept = 1,
    /// Multishot recv on a connection.
    Recv = 2,
    /// Send on a connection.
    Send = 3,
    /// Close of a connection's descriptor.
    Close = 4,
    /// Cancellation request.
    Cancel = 5,
    /// Shutdown of a connection's socket (`shutdown(2)`).
    Shutdown = 6,
    /// Reading a connection's peer address (`getsockopt(SO_PEERNAME)`).
    PeerName = 7,
    /// A wake-up posted into this ring by another shard's `MSG_RING`: no operation of
    /// this ring stands behind it.
    Wake = 8,
    /// This ring's own `MSG_RING` to another shard completed.
    MsgRing = 9,
    /// The read of the shard's eventfd (foreign threads' wake-ups).
    EventFd = 10,
    /// `IORING_OP_FIXED_FD_INSTALL`: a plain descriptor for a direct one (handover).
    FdInstall = 11,
    /// `IORING_OP_FILES_UPDATE` into a free direct slot: a socket from another process
    /// (handover); the index is the shard's token.
    FilesUpdate = 12,
}

impl Op {
    fn from_u8(byte: u8) -> Option<Op> {
        Some(match byte {
            1 => Op::Accept,
            2 => Op::Recv,
            3 => Op::Send,
            4 => Op::Close,
            5 => Op::Cancel,
            6 => Op::Shutdown,
            7 => Op::PeerName,
            8 => Op::Wake,
            9 => Op::MsgRing,
            10 => Op::EventFd,
            11 => Op::FdInstall,
            12 => Op::FilesUpdate,
            _ => return None,
        })
    }
}

/// An operation's identity packed into the `u64` user_data of its SQE and CQEs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserData {
    /// What the operation is.
    pub op: Op,
    /// The slot it belongs to (a connection index, for instance).
    pub index: u32,
    /// Free for the caller, such as a generation to recognise a reused slot; only the
    /// low 24 bits are kept.
    pub tag: u32,
}

impl UserData {
    /// The largest tag that survives encoding.
    pub const MAX_TAG: u32 = (1 << 24) - 1;

    /// An identity with tag 0.
    pub fn new(op: Op, index: u32) -> Self {
        UserData { op, index, tag: 0 }
    }

    /// Packs into a `u64`.
    ///
    /// # Panics
    ///
    /// In debug builds, if `tag` does not fit in 24 bits.
    pub fn encode(self) -> u64 {
        debug_assert!(self.tag <= Self::MAX_TAG, "tag {} too large", self.tag);
        (u64::from(self.op as u8) << 56)
            | (u64::from(self.tag & Self::MAX_TAG) << 32)
            | u64::from(self.index)
    }

    /// Unpacks a `u64` made by [`UserData::encode`]; `None` for an unknown op kind
    /// (such as user_data 0).
    pub fn decode(raw: u64) -> Option<Self> {
        let op = Op::from_u8((raw >> 56) as u8)?;
        Some(UserData {
            op,
            index: raw as u32,
            tag: ((raw >> 32) as u32) & Self::MAX_TAG,
        })
    }
}

/// The id of the provided buffer a completion used (`IORING_CQE_F_BUFFER`), if any.
pub fn buffer_id(flags: u32) -> Option<u16> {
    cqueue::buffer_select(flags)
}

/// Whether a multishot operation stays armed after this completion
/// (`IORING_CQE_F_MORE`). When it is clear, the operation is over and must be
/// submitted again to keep going.
pub fn has_more(flags: u32) -> bool {
    cqueue::more(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for op in [
            Op::Accept,
            Op::Recv,
            Op::Send,
            Op::Close,
            Op::Cancel,
            Op::Shutdown,
            Op::PeerName,
        ] {
            for index in [0, 1, 0xdead_beef, u32::MAX] {
                for tag in [0, 1, UserData::MAX_TAG] {
                    let ud = UserData { op, index, tag };
                    assert_eq!(UserData::decode(ud.encode()), Some(ud));
                }
            }
        }
    }

    #[test]
    fn unknown_kinds_do_not_decode() {
        assert_eq!(UserData::decode(0), None);
        assert_eq!(UserData::decode(u64::MAX), None);
    }

    #[test]
    fn buffer_id_and_more_from_flags() {
        // IORING_CQE_F_BUFFER = 1, IORING_CQE_F_MORE = 2, buffer id in the upper 16 bits.
        assert_eq!(buffer_id(0), None);
        assert_eq!(buffer_id(1 | (42 << 16)), Some(42));
        assert!(has_more(2));
        assert!(!has_more(1 | (42 << 16)));
    }
}
