//! The handle to one stream: receive, send, half-close, reset.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use burrow_proto::connect::Dial;
use burrow_proto::message::Open;
use burrow_proto::{ErrorCode, Frame, StreamId};
use bytes::Bytes;
use tokio::time::Instant;

use super::{Shared, Slot, State};
use crate::session::StreamError;

/// One multiplexed stream. Dropping it before both directions finished resets it.
///
/// `recv` and `send` take `&self` so one task can run both directions concurrently
/// (`tokio::join!`); each direction must have a single caller at a time.
pub struct Stream {
    id: StreamId,
    shared: Arc<Shared>,
    open: Open,
    /// What a connector asked for, on a connector's stream (see [`burrow_proto::connect`]).
    dial: Option<Dial>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.id)
            .field("open", &self.open)
            .finish()
    }
}

fn slot_error(st: &State, slot: Option<&Slot>) -> Option<StreamError> {
    match slot {
        Some(s) if s.reset.is_some() => s.reset.map(StreamError::Reset),
        _ if st.end.is_some() => Some(StreamError::SessionClosed),
        None => Some(StreamError::Reset(ErrorCode::Internal)),
        Some(_) => None,
    }
}

impl Stream {
    pub(crate) fn new(id: StreamId, shared: Arc<Shared>, open: Open) -> Self {
        Stream {
            id,
            shared,
            open,
            dial: None,
        }
    }

    /// The stream with the [`Dial`] its Open carried.
    pub(crate) fn with_dial(mut self, dial: Option<Dial>) -> Self {
        self.dial = dial;
        self
    }

    /// The [`Dial`] the stream's Open carried: what a connector asked for.
    pub fn dial(&self) -> Option<&Dial> {
        self.dial.as_ref()
    }

    /// The code the stream was reset with (by the peer or here), if it was.
    pub fn reset_code(&self) -> Option<ErrorCode> {
        self.shared.lock().slots.get(&self.id).and_then(|s| s.reset)
    }

    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// The Open that created it: service id and client address.
    pub fn info(&self) -> &Open {
        &self.open
    }

    /// The next chunk from the peer; `Ok(None)` once the peer has finished sending.
    /// Reading returns flow-control credit to the peer.
    pub async fn recv(&self) -> Result<Option<Bytes>, StreamError> {
        let mut one = Vec::with_capacity(1);
        Ok(match self.recv_many(&mut one, 0).await? {
            true => {
                let chunk = one.pop();
                self.release(chunk.as_ref().map_or(0, Bytes::len));
                chunk
            }
            false => None,
        })
    }

    /// Waits for data from the peer, then moves every chunk already received into `out`, up
    /// to `max` bytes (the first chunk always, whatever its size). `Ok(false)` once the peer
    /// has finished sending and everything was read. Taking a burst at once costs one lock,
    /// and lets the caller hand it to the socket in one vectored write.
    ///
    /// The flow-control credit of what was taken goes back to the peer only when the caller
    /// says the bytes are gone, with [`Stream::release`] (a relay, once it has written them
    /// to its socket): so what a slow local reader holds counts against the windows, and the
    /// memory held for one session stays bounded by its window however many streams it has.
    pub async fn recv_many(
        &self,
        out: &mut impl Extend<Bytes>,
        max: usize,
    ) -> Result<bool, StreamError> {
        let id = self.id;
        poll_fn(|cx| {
            let mut guard = self.shared.lock();
            let st = &mut *guard;
            let Some(slot) = st.slots.get_mut(&id) else {
                return Poll::Ready(Err(
                    slot_error(st, None).unwrap_or(StreamError::SessionClosed)
                ));
            };
            let mut taken = 0;
            while let Some(len) = slot.recv.front().map(Bytes::len) {
                if taken > 0 && taken + len > max {
                    break;
                }
                out.extend(slot.recv.pop_front());
                taken += len;
            }
            if taken > 0 {
                slot.taken += taken as u64;
                return Poll::Ready(Ok(true));
            }
            if slot.recv_fin {
                st.mux.finish_remote_consumed(id);
                return Poll::Ready(Ok(false));
            }
            if let Some(err) = slot_error(st, st.slots.get(&id)) {
                return Poll::Ready(Err(err));
            }
            if let Some(slot) = st.slots.get_mut(&id) {
                slot.recv_waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Gives back the credit of `n` bytes taken by [`Stream::recv_many`] (at most what was
    /// taken and not yet released; the rest is ignored). After a reset the credit has
    /// already been returned, and this does nothing.
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let id = self.id;
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let Some(slot) = st.slots.get_mut(&id) else {
            return;
        };
        let n = (n as u64).min(slot.taken);
        slot.taken -= n;
        if n == 0 {
            return;
        }
        let now = Instant::now().into_std();
        let (s, sess) = st.mux.on_consumed(id, n, now, st.rtt);
        if s.is_some() || sess.is_some() {
            st.push_window(id, s);
            st.push_window(0, sess);
            drop(guard);
            self.shared.writer.notify_one();
        }
    }

    /// Waits until the stream may send, then charges up to `max` bytes of flow-control credit
    /// to it and returns how many: the caller reads at most that many bytes from its source
    /// and hands them to [`Stream::send_reserved`]. Reading only what is already paid for
    /// means a relay never holds a buffer waiting for credit, so a thousand connections that
    /// push into a stalled session hold nothing beyond the session's window.
    pub async fn reserve(&self, max: usize) -> Result<usize, StreamError> {
        let id = self.id;
        let max = max.max(1);
        poll_fn(|cx| {
            let mut guard = self.shared.lock();
            let st = &mut *guard;
            if let Some(err) = slot_error(st, st.slots.get(&id)) {
                return Poll::Ready(Err(err));
            }
            let credit = st.mux.send_credit(id);
            let Some(slot) = st.slots.get_mut(&id) else {
                return Poll::Ready(Err(StreamError::SessionClosed));
            };
            if slot.out_fin {
                return Poll::Ready(Err(StreamError::Finished));
            }
            if slot.reserved > 0 {
                return Poll::Ready(Ok(slot.reserved));
            }
            let queued = slot.out_bytes;
            if credit == 0 || queued >= super::SEND_BUFFER {
                slot.send_waker = Some(cx.waker().clone());
                st.note_send_wait();
                return Poll::Pending;
            }
            let n = (credit as usize).min(max).min(super::SEND_BUFFER - queued);
            slot.reserved = n;
            st.mux.on_sent(id, n as u64);
            Poll::Ready(Ok(n))
        })
        .await
    }

    /// Queues `data`, which must fit in what [`Stream::reserve`] granted, without waiting for
    /// credit, and gives back whatever of the reservation it did not use (so an empty `data`
    /// just cancels the reservation). Writes the connection itself unless someone else is.
    pub async fn send_reserved(&self, data: Bytes) -> Result<(), StreamError> {
        let id = self.id;
        {
            let mut guard = self.shared.lock();
            let st = &mut *guard;
            if let Some(err) = slot_error(st, st.slots.get(&id)) {
                return Err(err);
            }
            let max = self.shared.params.max_payload as usize;
            let Some(slot) = st.slots.get_mut(&id) else {
                return Err(StreamError::SessionClosed);
            };
            debug_assert!(data.len() <= slot.reserved, "sent more than was reserved");
            let used = data.len().min(slot.reserved);
            let unused = slot.reserved - used;
            slot.reserved = 0;
            let mut data = data.slice(..used);
            while !data.is_empty() {
                let chunk = data.split_to(max.min(data.len()));
                slot.out_bytes += chunk.len();
                slot.out.push_back(chunk);
            }
            if unused > 0 {
                let was_low = st.mux.session_credit() == 0;
                st.mux.unsend(id, unused as u64);
                if was_low {
                    st.session_credit_returned();
                }
            }
            if used == 0 {
                return Ok(());
            }
            st.enqueue(id);
        }
        self.shared.flush_now().await;
        Ok(())
    }

    /// Sends `data`, waiting for flow-control credit and queue space as needed. Returns once
    /// all of it is queued for the writer.
    pub async fn send(&self, mut data: Bytes) -> Result<(), StreamError> {
        let id = self.id;
        let max = self.shared.params.max_payload as usize;
        let result = poll_fn(|cx| {
            let mut guard = self.shared.lock();
            let st = &mut *guard;
            let mut queued = false;
            let result = loop {
                if let Some(err) = slot_error(st, st.slots.get(&id)) {
                    break Poll::Ready(Err(err));
                }
                if data.is_empty() {
                    break Poll::Ready(Ok(()));
                }
                let credit = st.mux.send_credit(id);
                let Some(slot) = st.slots.get_mut(&id) else {
                    break Poll::Ready(Err(StreamError::SessionClosed));
                };
                if slot.out_fin {
                    break Poll::Ready(Err(StreamError::Finished));
                }
                if credit == 0 || slot.out_bytes + slot.reserved >= super::SEND_BUFFER {
                    slot.send_waker = Some(cx.waker().clone());
                    st.note_send_wait();
                    break Poll::Pending;
                }
                let n = (credit as usize).min(max).min(data.len());
                let chunk = data.split_to(n);
                slot.out.push_back(chunk);
                slot.out_bytes += n;
                st.mux.on_sent(id, n as u64);
                st.enqueue(id);
                queued = true;
            };
            drop(guard);
            // While waiting for credit, the writer must send what is queued; once everything
            // is queued, this task writes it itself (below) unless someone else is writing.
            if queued && result.is_pending() {
                self.shared.writer.notify_one();
            }
            result
        })
        .await;
        if result.is_ok() {
            self.shared.flush_now().await;
        }
        result
    }

    /// Half-closes our direction: the peer reads to the end of what was sent, then `None`.
    pub fn finish(&self) {
        let mut st = self.shared.lock();
        if let Some(slot) = st.slots.get_mut(&self.id) {
            if slot.out_fin || slot.reset.is_some() {
                return;
            }
            slot.out_fin = true;
        } else {
            return;
        }
        st.mux.finish_local(self.id);
        st.enqueue(self.id);
        drop(st);
        self.shared.writer.notify_one();
    }

    /// Aborts the stream in both directions, telling the peer why.
    pub fn reset(&self, code: ErrorCode) {
        let mut st = self.shared.lock();
        reset_locked(&mut st, self.id, code);
        drop(st);
        self.shared.writer.notify_one();
    }
}

/// Resets `id` if it is still open: Reset frame, credit of what it held (received, queued,
/// reserved) returned, output dropped.
fn reset_locked(st: &mut State, id: StreamId, code: ErrorCode) {
    if st.slots.get(&id).is_some_and(|s| s.reset.is_some()) {
        return;
    }
    st.discard_recv(id);
    st.drop_output(id);
    let open = st.mux.contains(id);
    if let Some(slot) = st.slots.get_mut(&id) {
        slot.reset = Some(code);
        slot.wake_all();
    }
    if open && st.end.is_none() {
        st.push_control(Frame::reset(id, code));
        let now = Instant::now().into_std();
        let credit = st.mux.remove(id, now);
        st.push_window(0, credit);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let id = self.id;
        // Finished cleanly both ways: let the writer flush what is queued, then forget it.
        let clean = !st.mux.contains(id)
            && st
                .slots
                .get(&id)
                .is_some_and(|s| s.reset.is_none() && s.out_fin);
        if !clean {
            reset_locked(&mut st, id, ErrorCode::StreamReset);
        }
        st.discard_recv(id);
        let remove = match st.slots.get_mut(&id) {
            Some(slot) => {
                slot.detached = true;
                slot.recv_waker = None;
                slot.send_waker = None;
                !slot.has_output() || slot.reset.is_some()
            }
            None => false,
        };
        if remove {
            st.slots.remove(&id);
        }
        drop(st);
        self.shared.writer.notify_one();
    }
}
