//! The session layer over an in-memory pipe: credit for bytes a stream never read comes back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use burrow::proto::message::{Open, SessionParams};
use burrow::proto::ErrorCode;
use burrow::session::{Started, Stream, StreamError};
use bytes::Bytes;

/// Windows so small that one leaked stream's worth of credit stalls the next round.
fn params() -> SessionParams {
    SessionParams {
        max_payload: 1024,
        stream_window: 1024,
        max_stream_window: 1024,
        session_window: 2048,
        ..SessionParams::default()
    }
}

fn pair() -> (Started, Started) {
    pair_with(params())
}

/// A gateway session and an agent session over one in-memory pipe.
fn pair_with(params: SessionParams) -> (Started, Started) {
    common::session_pair(params)
}

/// Opens a stream to service 0 from `side`.
fn open(side: &Started) -> Stream {
    side.session
        .open(&Open {
            service: 0,
            client: None,
        })
        .unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Ending {
    /// The sender resets; the receiver drops the stream unread.
    PeerReset,
    /// Both sides finish; the receiver drops the stream unread.
    BothFin,
    /// Both sides finish; the receiver resets it unread.
    BothFinThenReset,
}

async fn rounds_complete(ending: Ending) {
    let (gw, mut ag) = pair();
    for round in 0..6 {
        let s = open(&gw);
        tokio::time::timeout(Duration::from_secs(5), s.send(Bytes::from(vec![7u8; 1024])))
            .await
            .unwrap_or_else(|_| panic!("{ending:?}: round {round} stalled: session credit leaked"))
            .unwrap();
        let r = ag.incoming.recv().await.unwrap();
        match ending {
            Ending::PeerReset => {
                s.reset(ErrorCode::StreamReset);
                // Frames arrive in order: once the reset is seen, the 1 KiB sits unread in `r`.
                let mut seen = false;
                for _ in 0..500 {
                    if matches!(
                        r.send(Bytes::from_static(b"x")).await,
                        Err(StreamError::Reset(_))
                    ) {
                        seen = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                assert!(seen, "reset reached the other side");
                drop(r);
            }
            Ending::BothFin | Ending::BothFinThenReset => {
                s.finish();
                // Let the data and the FIN land in `r` first, so `r.finish()` closes the stream
                // cleanly both ways with the bytes still unread.
                tokio::time::sleep(Duration::from_millis(20)).await;
                r.finish();
                assert_eq!(
                    s.recv().await.unwrap(),
                    None,
                    "sender sees the receiver's FIN"
                );
                if let Ending::BothFinThenReset = ending {
                    r.reset(ErrorCode::StreamReset);
                }
                drop(r);
            }
        }
        drop(s);
    }
    assert!(!gw.session.is_closed() && !ag.session.is_closed());
}

#[tokio::test]
async fn unread_bytes_of_a_reset_stream_return_their_credit() {
    rounds_complete(Ending::PeerReset).await;
}

#[tokio::test]
async fn unread_bytes_of_a_finished_stream_return_their_credit() {
    rounds_complete(Ending::BothFin).await;
}

#[tokio::test]
async fn unread_bytes_of_a_finished_then_reset_stream_return_their_credit() {
    rounds_complete(Ending::BothFinThenReset).await;
}

/// `recv_many` hands over what has arrived, in order, no more than asked for (but always at
/// least one chunk), and tells the end of the stream apart from data.
#[tokio::test]
async fn recv_many_takes_queued_chunks_in_order_up_to_the_limit() {
    let (gw, mut ag) = pair_with(SessionParams {
        max_payload: 1024,
        ..SessionParams::default()
    });
    let sent: Vec<u8> = (0..8 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let s = open(&gw);
    s.send(Bytes::from(sent.clone())).await.unwrap();
    s.finish();
    let r = ag.incoming.recv().await.unwrap();
    // Let all eight 1 KiB frames and the FIN arrive.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut got = Vec::new();
    assert!(r.recv_many(&mut got, 3000).await.unwrap());
    assert_eq!(
        got.len(),
        2,
        "two 1 KiB chunks fit in 3000 bytes, three do not"
    );
    assert!(r.recv_many(&mut got, 0).await.unwrap());
    assert_eq!(got.len(), 3, "a limit below one chunk still takes one");
    assert!(r.recv_many(&mut got, usize::MAX).await.unwrap());
    assert_eq!(got.len(), 8, "the rest at once");
    assert!(
        !r.recv_many(&mut got, usize::MAX).await.unwrap(),
        "then the end"
    );
    assert_eq!(got.concat(), sent, "bytes in order");
}

/// Every idle connection holds one relay task, so the task's size is memory per connection.
/// Holding a 64-entry slice array across an await once added 1 KiB of it at each end.
#[tokio::test]
async fn a_relay_task_stays_under_1_kib() {
    let (gw, _ag) = pair();
    let s = open(&gw);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let mut local = burrow::relay::Local::Tcp(tcp);
    let task = burrow::relay::relay(&s, &mut local);
    let size = std::mem::size_of_val(&task);
    assert!(size < 1024, "relay future is {size} bytes");
}
