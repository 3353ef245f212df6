//! The byte pattern every throughput stream carries, and the cheap check of it.
//!
//! The byte at stream offset `k` is `k % 251`. Writers send a buffer whose length is a multiple
//! of the period, so repeated writes keep the pattern continuous; readers check the first, middle
//! and last byte of every chunk they receive. That costs nothing per byte yet catches lost,
//! duplicated or reordered chunks, which would shift the pattern.

/// The pattern's period: a prime, so it never lines up with power-of-two buffer sizes.
const PERIOD: usize = 251;

/// What a receiver reports instead of a byte count when the pattern was broken.
pub const CORRUPT: u64 = u64::MAX;

/// The byte at stream offset `offset`.
fn byte_at(offset: u64) -> u8 {
    // The remainder is below 251, so the cast is exact.
    (offset % PERIOD as u64) as u8
}

/// A write buffer of about `approx_len` bytes (at least one period) that starts at offset 0
/// and whose length is a multiple of the period.
pub fn buffer(approx_len: usize) -> Vec<u8> {
    let len = (approx_len / PERIOD).max(1) * PERIOD;
    (0..len as u64).map(byte_at).collect()
}

/// Whether `chunk`, received at stream offset `offset`, fits the pattern.
pub fn check(offset: u64, chunk: &[u8]) -> bool {
    let len = chunk.len();
    [0, len / 2, len.saturating_sub(1)]
        .into_iter()
        .filter(|&i| i < len)
        .all(|i| chunk[i] == byte_at(offset + i as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_is_whole_periods() {
        assert_eq!(buffer(256 * 1024).len() % PERIOD, 0);
        assert_eq!(buffer(1).len(), PERIOD);
    }

    #[test]
    fn consecutive_buffers_pass_and_shifted_ones_fail() {
        let buf = buffer(4096);
        let len = buf.len() as u64;
        assert!(check(0, &buf));
        assert!(check(len, &buf));
        assert!(check(len + 10, &buf[10..]));
        assert!(!check(len + 9, &buf[10..]));
        assert!(!check(1, &buf));
        assert!(check(7, &[]));
    }
}
