//! Flow-control windows: how much a sender may send, and when a receiver grants more.
//!
//! The receiver grants credit as the application *consumes* bytes, not as they arrive, so a
//! reader that stops holds at most its window in memory. A window that is used up faster
//! than twice the round-trip time doubles (up to a cap), so one stream can fill a fast link
//! without every stream paying for a large window up front.

use std::time::{Duration, Instant};

use crate::error::{ErrorCode, ProtocolError};

/// Largest credit a sender may hold; more is a flow-control violation (as in HTTP/2).
pub const MAX_CREDIT: u64 = (1 << 31) - 1;

/// Credit a sender holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWindow {
    credit: u64,
}

impl SendWindow {
    /// Starts with `initial` bytes of credit.
    pub fn new(initial: u32) -> Self {
        SendWindow {
            credit: u64::from(initial),
        }
    }

    /// Bytes that may be sent now.
    pub fn available(&self) -> u64 {
        self.credit
    }

    /// Records `n` bytes sent. Panics in debug builds if `n` exceeds the credit: that is a bug
    /// on our side, never the peer's.
    pub fn consume(&mut self, n: u64) {
        debug_assert!(
            n <= self.credit,
            "sent {n} bytes with {} credit",
            self.credit
        );
        self.credit = self.credit.saturating_sub(n);
    }

    /// Gives back `n` bytes of credit that were charged for bytes never sent (dropped from a
    /// queue by a reset, or reserved and not used). Saturates at [`MAX_CREDIT`]: the credit was
    /// ours before, so this never exceeds what the peer granted.
    pub fn refund(&mut self, n: u64) {
        self.credit = (self.credit + n).min(MAX_CREDIT);
    }

    /// Adds credit from the peer's Window frame.
    pub fn grant(&mut self, increment: u32) -> Result<(), ProtocolError> {
        let next = self.credit + u64::from(increment);
        if next > MAX_CREDIT {
            return Err(ProtocolError::new(
                ErrorCode::FlowControl,
                format!(
                    "window update of {increment} overflows the credit of {}",
                    self.credit
                ),
            ));
        }
        self.credit = next;
        Ok(())
    }
}

/// What a receiver has allowed, received and handed on.
#[derive(Debug, Clone)]
pub struct RecvWindow {
    /// Current window size (grows by auto-tuning).
    size: u32,
    /// Cap for auto-tuning.
    max_size: u32,
    /// Cumulative bytes the peer may send.
    limit: u64,
    /// Cumulative bytes received.
    received: u64,
    /// Cumulative bytes handed to the application.
    consumed: u64,
    /// When credit was last granted, for auto-tuning.
    last_grant: Option<Instant>,
}

impl RecvWindow {
    /// A window of `size` bytes that may grow to `max_size`.
    pub fn new(size: u32, max_size: u32) -> Self {
        RecvWindow {
            size,
            max_size: max_size.max(size),
            limit: u64::from(size),
            received: 0,
            consumed: 0,
            last_grant: None,
        }
    }

    /// Records `n` bytes arriving; an error if the peer overran the window.
    pub fn on_data(&mut self, n: u64) -> Result<(), ProtocolError> {
        let next = self.received + n;
        if next > self.limit {
            return Err(ProtocolError::new(
                ErrorCode::FlowControl,
                format!(
                    "peer sent {} bytes beyond its window of {}",
                    next - self.limit,
                    self.size
                ),
            ));
        }
        self.received = next;
        Ok(())
    }

    /// Cumulative bytes the peer may send (what we granted, including the initial window).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Cumulative bytes received.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Cumulative bytes handed to the application.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Bytes received but not yet consumed (what the receiver holds in memory).
    pub fn buffered(&self) -> u64 {
        self.received - self.consumed
    }

    /// Current window size.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Records `n` bytes consumed; returns the increment to send to the peer, if one is due.
    ///
    /// Credit is returned once half the window is consumed, which keeps update frames rare
    /// while the sender never waits on a full round trip.
    pub fn on_consumed(&mut self, n: u64, now: Instant, rtt: Duration) -> Option<u32> {
        self.consumed = (self.consumed + n).min(self.received);
        let outstanding = self.limit - self.consumed;
        if outstanding > u64::from(self.size / 2) {
            return None;
        }
        // Used a whole half-window within two round trips: the window is what limits
        // throughput, so let it grow.
        if let Some(last) = self.last_grant {
            if now.saturating_duration_since(last) < rtt * 2 && self.size < self.max_size {
                self.size = self.size.saturating_mul(2).min(self.max_size);
            }
        }
        self.last_grant = Some(now);
        let new_limit = self.consumed + u64::from(self.size);
        let inc = new_limit - self.limit;
        self.limit = new_limit;
        u32::try_from(inc).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrun_is_an_error() {
        let mut w = RecvWindow::new(100, 100);
        w.on_data(60).unwrap();
        w.on_data(40).unwrap();
        assert_eq!(w.on_data(1).unwrap_err().code, ErrorCode::FlowControl);
    }

    #[test]
    fn credit_returned_after_half_consumed() {
        let now = Instant::now();
        let rtt = Duration::from_millis(1);
        let mut w = RecvWindow::new(100, 100);
        w.on_data(100).unwrap();
        assert_eq!(w.on_consumed(40, now, rtt), None);
        assert_eq!(w.on_consumed(20, now, rtt), Some(60));
        assert_eq!(w.buffered(), 40);
        // The peer may now send 60 more, not 61.
        w.on_data(60).unwrap();
        assert!(w.on_data(1).is_err());
    }

    #[test]
    fn window_grows_when_drained_fast_and_stops_at_cap() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(10);
        let mut w = RecvWindow::new(100, 400);
        for i in 0..10u64 {
            let n = u64::from(w.size());
            w.on_data(n).unwrap();
            w.on_consumed(n, t0 + Duration::from_millis(i), rtt);
        }
        assert_eq!(w.size(), 400);
    }

    #[test]
    fn window_stays_when_drained_slowly() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(1);
        let mut w = RecvWindow::new(100, 400);
        for i in 0..5u64 {
            w.on_data(100).unwrap();
            w.on_consumed(100, t0 + Duration::from_secs(i), rtt);
        }
        assert_eq!(w.size(), 100);
    }

    #[test]
    fn send_credit_overflow_rejected() {
        let mut s = SendWindow::new(10);
        s.consume(10);
        assert_eq!(s.available(), 0);
        s.grant(5).unwrap();
        assert_eq!(s.available(), 5);
        assert!(s.grant(u32::MAX).is_err());
        s.refund(3);
        assert_eq!(s.available(), 8);
    }
}
