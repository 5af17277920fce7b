//! The iovecs of an [`Output`] of several buffers, for `sendmsg` (io_uring's
//! `IORING_OP_SENDMSG` and epoll's plain `sendmsg(2)` alike).

use crate::session::Output;

/// The most iovecs one `sendmsg` takes (`UIO_MAXIOV`); the rest goes in the next.
pub(crate) const MAX_IOVECS: usize = 1024;

/// A `sendmsg` header and the iovecs it points to. Boxed by its owner when the kernel
/// reads it after the call returns (io_uring), so that it stays put.
pub(crate) struct SendMsg {
    hdr: libc::msghdr,
    iov: Vec<libc::iovec>,
}

impl SendMsg {
    pub(crate) fn new() -> SendMsg {
        SendMsg {
            // SAFETY: all-zero is a valid msghdr (no name, no iovecs, no control data).
            hdr: unsafe { std::mem::zeroed() },
            iov: Vec::new(),
        }
    }

    /// Points the header at the bytes of `output` from `skip` on (at most
    /// [`MAX_IOVECS`] pieces). The pointers are valid while `output` is neither moved
    /// out of its buffers nor dropped.
    pub(crate) fn point_at(&mut self, output: &Output, mut skip: usize) -> *const libc::msghdr {
        self.iov.clear();
        let pieces = std::iter::once(&output.first[output.start..])
            .chain(output.rest.iter().map(|c| c.bytes()));
        for piece in pieces {
            if skip >= piece.len() {
                skip -= piece.len();
                continue;
            }
            let piece = &piece[skip..];
            skip = 0;
            self.iov.push(libc::iovec {
                iov_base: piece.as_ptr() as *mut libc::c_void,
                iov_len: piece.len(),
            });
            if self.iov.len() == MAX_IOVECS {
                break;
            }
        }
        self.hdr.msg_iov = self.iov.as_mut_ptr();
        self.hdr.msg_iovlen = self.iov.len();
        &self.hdr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Chunk;

    #[test]
    fn sendmsg_points_past_what_was_sent() {
        let output = Output {
            first: b"xxhello".to_vec(),
            start: 2,
            rest: vec![
                Chunk {
                    buf: b"?? big".to_vec(),
                    start: 2,
                },
                Chunk {
                    buf: b" world".to_vec(),
                    start: 0,
                },
            ],
        };
        let mut msg = SendMsg::new();
        let pieces = |msg: &SendMsg| -> Vec<Vec<u8>> {
            msg.iov
                .iter()
                .map(|v| {
                    let (base, len) = (v.iov_base as *const u8, v.iov_len);
                    // SAFETY: the iovecs point into `output`, alive and unchanged here.
                    unsafe { std::slice::from_raw_parts(base, len) }.to_vec()
                })
                .collect()
        };
        let hdr = msg.point_at(&output, 0);
        assert_eq!(hdr, &msg.hdr as *const _);
        assert_eq!(msg.hdr.msg_iovlen, 3);
        assert_eq!(pieces(&msg), [&b"hello"[..], b" big", b" world"]);
        // After a partial send of 7 bytes: "hello b" went.
        msg.point_at(&output, 7);
        assert_eq!(pieces(&msg), [&b"ig"[..], b" world"]);
        msg.point_at(&output, 9);
        assert_eq!(pieces(&msg), [&b" world"[..]]);
        msg.point_at(&output, 14);
        assert_eq!(pieces(&msg), [&b"d"[..]]);
        assert_eq!(output.len(), 15);
        // At most MAX_IOVECS per sendmsg.
        let many = Output {
            first: vec![1],
            start: 0,
            rest: (0..2000)
                .map(|_| Chunk {
                    buf: vec![2],
                    start: 0,
                })
                .collect(),
        };
        msg.point_at(&many, 0);
        assert_eq!(msg.iov.len(), MAX_IOVECS);
        msg.point_at(&many, 1500);
        assert_eq!(msg.iov.len(), 501);
    }
}
