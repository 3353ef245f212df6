//! The crypto floor: what sealing and opening the bytes once costs with the AEAD the TLS
//! session negotiates, measured in this process on one core, so the TLS tunnel's extra CPU
//! over the plain one can be read as a multiple of the least any encrypted tunnel must spend.
//!
//! Both ends of a Burrow TLS session prefer TLS 1.3 with AES-128-GCM (ring's provider; the
//! TLS tests check that it is what they negotiate), so the floor uses ring's AES-128-GCM
//! directly, in records of TLS's largest plaintext (16 KiB), each sealed once (by the sender)
//! and opened once (by the receiver), as the session does. The record buffer is reused, so
//! the floor is the AEAD's own speed on data in cache: the least any encrypted tunnel can
//! spend. (Sealing records spread over 64 MiB, or 5 bytes off alignment as rustls's records
//! are, measured the same on the machine of `docs/benchmarks.md`.)

use anyhow::{anyhow, ensure};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, NONCE_LEN};
use serde::Serialize;

/// The largest TLS record's plaintext: what a bulk transfer's records carry.
const RECORD: usize = 16 * 1024;
/// The AEAD's name in the table.
pub const AEAD: &str = "AES-128-GCM";

/// What sealing and opening `bytes` cost.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Floor {
    pub bytes: u64,
    /// CPU seconds of this thread for the seals and opens together.
    pub seconds: f64,
}

impl Floor {
    /// CPU seconds per GB (10^9 bytes), sealed once and opened once.
    pub fn per_gb(&self) -> f64 {
        self.seconds / (self.bytes as f64 / 1e9).max(1e-9)
    }
}

/// Seals and opens `bytes` (rounded up to whole records) and times this thread's CPU; fails
/// if an opened record is not the sealed one.
pub fn measure(bytes: u64) -> anyhow::Result<Floor> {
    let key = [0x42u8; 16];
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_128_GCM, &key).map_err(|_| anyhow!("AES-128-GCM key"))?,
    );
    let plain: Vec<u8> = (0..RECORD).map(|i| (i % 251) as u8).collect();
    let mut record = Vec::with_capacity(RECORD + AES_128_GCM.tag_len());
    let records = bytes.div_ceil(RECORD as u64).max(1);
    let started = thread_cpu();
    for seq in 0..records {
        record.clear();
        record.extend_from_slice(&plain);
        let aad = seq.to_be_bytes();
        key.seal_in_place_append_tag(nonce(seq), Aad::from(aad), &mut record)
            .map_err(|_| anyhow!("sealing a record failed"))?;
        let opened = key
            .open_in_place(nonce(seq), Aad::from(aad), &mut record)
            .map_err(|_| anyhow!("an opened record failed its tag check"))?;
        ensure!(
            opened.len() == RECORD && opened[RECORD - 1] == plain[RECORD - 1],
            "an opened record is not what was sealed"
        );
    }
    let seconds = thread_cpu() - started;
    ensure!(
        record[..RECORD] == plain[..],
        "the last opened record is not what was sealed"
    );
    Ok(Floor {
        bytes: records * RECORD as u64,
        seconds,
    })
}

/// A TLS 1.3-style nonce: the record's sequence number in the last eight bytes.
fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[NONCE_LEN - 8..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// This thread's CPU time, seconds.
fn thread_cpu() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_whole_records() {
        let floor = measure(100_000).unwrap();
        assert_eq!(floor.bytes, 7 * RECORD as u64);
        assert!(floor.seconds > 0.0 && floor.per_gb() > 0.0, "{floor:?}");
    }
}
