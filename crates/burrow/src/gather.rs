//! Vectored writes from a queue of chunks, shared by the session writer (its batch of
//! frames) and the relay (data received for the local socket).
//!
//! The slice array lives only in the stack frame of [`with_slices`], never in the state of
//! an async task: those tasks exist once per connection, and 1 KiB of slices held across an
//! `.await` is 1 KiB more for every idle connection.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// Most chunks handed to one vectored write (the kernel takes up to 1024).
pub(crate) const MAX_SLICES: usize = 64;

/// Calls `write` with the first chunks of `chunks` (at most [`MAX_SLICES`]) as slices.
pub(crate) fn with_slices<T>(
    chunks: &VecDeque<Bytes>,
    write: impl FnOnce(&[IoSlice<'_>]) -> T,
) -> T {
    let mut slices = [IoSlice::new(&[]); MAX_SLICES];
    let mut count = 0;
    for (slice, chunk) in slices.iter_mut().zip(chunks) {
        *slice = IoSlice::new(chunk);
        count += 1;
    }
    write(&slices[..count])
}

/// Drops the `n` bytes a write took from the front of `chunks`, with the chunks it emptied.
pub(crate) fn consume(chunks: &mut VecDeque<Bytes>, mut n: usize) {
    while let Some(front) = chunks.front_mut() {
        if front.len() > n {
            front.advance(n);
            return;
        }
        n -= front.len();
        chunks.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_drops_whole_chunks_and_cuts_the_next() {
        let mut q: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fgh"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        consume(&mut q, 6);
        assert_eq!(q, [Bytes::from_static(b"gh")]);
        consume(&mut q, 2);
        assert!(q.is_empty());
    }

    #[test]
    fn slices_stop_at_the_limit() {
        let q: VecDeque<Bytes> = (0..MAX_SLICES + 5)
            .map(|_| Bytes::from_static(b"x"))
            .collect();
        assert_eq!(with_slices(&q, |slices| slices.len()), MAX_SLICES);
    }
}
