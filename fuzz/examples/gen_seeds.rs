//! Writes the hand-made seed corpus: valid encodings of every frame and message kind, plus a
//! few operation sequences for the `mux` target.
//!
//! Run from `fuzz/`: `cargo run --example gen_seeds` (an ordinary build; no nightly flags).
//! It rewrites the `seed-*` files in `corpus/<target>/` and leaves other files alone.
//!
//! The `mux` seeds are hand-encoded in the `arbitrary` 1.x format (integers little-endian,
//! an enum variant as a `u32` picked by multiply-and-shift, the trailing `Vec<Op>` as
//! "continue" bytes before each element). They must follow the declaration order in
//! `fuzz_targets/mux.rs`; check one with `cargo fuzz fmt mux corpus/mux/<file>`.

use std::fs;
use std::path::Path;

use burrow_proto::auth::{encode_b64, SecretKey};
use burrow_proto::connect::{Announce, Dial, DialTarget, DIAL_SERVICE};
use burrow_proto::frame::{Header, FIN};
use burrow_proto::message::{
    preamble, Auth, AuthOk, Bind, BindResult, Challenge, GoAway, Open, Protocol, Role,
    SessionParams, StreamLimits, Unbind,
};
use burrow_proto::{ErrorCode, Frame, Kind};
use bytes::{Bytes, BytesMut};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).expect("create corpus dir");
    fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
}

fn small_params() -> SessionParams {
    SessionParams {
        stream_window: 2048,
        max_stream_window: 8192,
        session_window: 4096,
        max_streams: 8,
        ..SessionParams::default()
    }
}

/// One sample of every frame kind, with a name.
fn frames() -> Vec<(&'static str, Frame)> {
    let v4 = Open {
        service: 1,
        client: Some("192.0.2.7:40000".parse().expect("addr")),
    };
    let v6 = Open {
        service: 2,
        client: Some("[2001:db8::1]:443".parse().expect("addr")),
    };
    vec![
        (
            "data",
            Frame::new(Kind::Data, 0, 1, Bytes::from_static(b"hello")),
        ),
        (
            "data-fin",
            Frame::new(Kind::Data, FIN, 2, Bytes::from_static(b"bye")),
        ),
        (
            "data-empty-fin",
            Frame::new(Kind::Data, FIN, 3, Bytes::new()),
        ),
        ("open-v4", v4.to_frame(1)),
        ("open-v6", v6.to_frame(3)),
        (
            "open-none",
            Open {
                service: 0,
                client: None,
            }
            .to_frame(2),
        ),
        ("window-session", Frame::window(0, 65_536)),
        ("window-stream", Frame::window(5, 1024)),
        ("reset", Frame::reset(7, ErrorCode::ConnectRefused)),
        ("ping", Frame::ping(0x0102_0304_0506_0708, false)),
        ("ping-ack", Frame::ping(42, true)),
        (
            "goaway",
            GoAway {
                code: ErrorCode::Shutdown,
                message: "bye".into(),
            }
            .to_frame(),
        ),
        (
            "datagram",
            Frame::new(Kind::Datagram, 0, 9, Bytes::from_static(b"udp")),
        ),
        (
            "challenge",
            Challenge {
                nonce: [0xab; 32],
                proxied: false,
            }
            .to_frame(),
        ),
        (
            "challenge-proxied",
            Challenge {
                nonce: [0xab; 32],
                proxied: true,
            }
            .to_frame(),
        ),
        (
            "auth",
            Auth {
                role: Role::Agent,
                public_key: [1; 32],
                signature: [2; 64],
                limits: None,
            }
            .to_frame(),
        ),
        (
            "authok",
            AuthOk {
                name: "home".into(),
                params: small_params(),
                features: burrow_proto::message::FEATURES,
            }
            .to_frame(),
        ),
        (
            "bind",
            Bind {
                service: 1,
                protocol: Protocol::Tcp,
                port: 8080,
                name: "web".into(),
                path: None,
                group: None,
            }
            .to_frame(),
        ),
        (
            "bind_grouped",
            Bind {
                service: 2,
                protocol: Protocol::Tcp,
                port: 0,
                name: "api".into(),
                path: None,
                group: Some("web-pool".into()),
            }
            .to_frame(),
        ),
        (
            "bind-unix",
            Bind {
                service: 2,
                protocol: Protocol::Tcp,
                port: 0,
                name: "docker".into(),
                path: Some("/run/burrow/docker.sock".into()),
                group: None,
            }
            .to_frame(),
        ),
        ("unbind", Unbind { service: 1 }.to_frame()),
        // The connector's: an agent's private service (kind 0x16), and an Open carrying a Dial.
        (
            "announce",
            Announce {
                service: 0x8000_0000,
                name: "vnc".into(),
            }
            .to_frame(),
        ),
        (
            "open-dial",
            Dial {
                agent: "office".into(),
                target: DialTarget::Service("vnc".into()),
                connector: "laptop".into(),
                probe: false,
            }
            .open_frame(
                &Open {
                    service: DIAL_SERVICE,
                    client: Some("192.0.2.7:40000".parse().expect("address")),
                },
                2,
            ),
        ),
        (
            "bindresult",
            BindResult {
                service: 1,
                code: ErrorCode::Normal,
                text: "203.0.113.5:8080".into(),
            }
            .to_frame(),
        ),
    ]
}

fn frame_decoder() {
    // Prefix: max payload 64 * 4 = 256, one chunk-size byte, 0 = everything at once.
    let whole = [64u8, 0, 0];
    let mut all = BytesMut::new();
    for (name, f) in frames() {
        let mut buf = BytesMut::from(&whole[..]);
        f.encode(&mut buf);
        f.encode(&mut all);
        write("frame_decoder", name, &buf);
    }
    // Every frame back to back, fed in pieces of 1, 3, 7 and 10 bytes.
    let mut buf = BytesMut::from(&[64u8, 3, 1, 3, 7, 10][..]);
    buf.extend_from_slice(&all);
    write("frame_decoder", "all-chunked", &buf);
    // A header over the limit, an unknown kind, a session kind on a stream, a cut frame.
    let mut buf = BytesMut::from(&whole[..]);
    Header {
        kind: Kind::Data,
        flags: 0,
        stream: 1,
        length: 257,
    }
    .encode(&mut buf);
    write("frame_decoder", "too-large", &buf);
    write(
        "frame_decoder",
        "bad-kind",
        &[64, 0, 0, 0x7f, 0, 0, 0, 0, 1, 0, 0, 0, 0],
    );
    write(
        "frame_decoder",
        "ping-on-stream",
        &[
            64, 0, 0, 0x04, 0, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    let mut buf = BytesMut::from(&[64u8, 0, 2][..]);
    Frame::new(Kind::Data, 0, 1, Bytes::from_static(b"cut short")).encode(&mut buf);
    buf.truncate(buf.len() - 3);
    write("frame_decoder", "truncated", &buf);
}

fn messages() {
    for (name, f) in frames() {
        if !matches!(f.header.kind, Kind::Data | Kind::Datagram) {
            write("messages", name, &f.payload);
        }
    }
    let with_limits = Auth {
        role: Role::Agent,
        public_key: [3; 32],
        signature: [4; 64],
        limits: Some(StreamLimits {
            max_payload: 16 * 1024,
            max_streams: 64,
            stream_window: 64 * 1024,
            max_stream_window: 256 * 1024,
            session_window: 1024 * 1024,
        }),
    };
    write("messages", "auth-limits", &with_limits.to_frame().payload);
    write("messages", "preamble", &preamble());
    // A throwaway key made from a fixed seed: test data, not a secret.
    let key = SecretKey::parse(&format!("bk_{}", encode_b64(&[7; 32]))).expect("key");
    write("messages", "key", key.expose().as_bytes());
    write("messages", "key-hash", key.hash().to_string().as_bytes());
}

/// Encoder for the `arbitrary` format of `fuzz_targets/mux.rs`.
#[derive(Default)]
struct Ops(Vec<u8>);

impl Ops {
    fn variant(&mut self, index: u64, count: u64) -> &mut Self {
        // The smallest u32 v with (v * count) >> 32 == index.
        let v = (index << 32).div_ceil(count);
        self.0.extend_from_slice(&(v as u32).to_le_bytes());
        self
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn op(&mut self, index: u64) -> &mut Self {
        self.u8(1).variant(index, 13)
    }
    fn id(&mut self, index: u64, arg: u32) -> &mut Self {
        self.variant(index, 4);
        if index == 3 {
            self.u32(arg)
        } else {
            self.u8(arg as u8)
        }
    }
    // IdSel variants.
    fn known(&mut self, i: u8) -> &mut Self {
        self.id(0, u32::from(i))
    }
    fn next_remote(&mut self) -> &mut Self {
        self.id(1, 0)
    }
    fn local(&mut self, k: u8) -> &mut Self {
        self.id(2, u32::from(k))
    }
    // Op variants, in declaration order.
    fn peer_open(&mut self) -> &mut Self {
        self.op(0).next_remote()
    }
    fn peer_data_fraction(&mut self, known: u8, frac: u8, fin: bool) -> &mut Self {
        self.op(1)
            .known(known)
            .variant(0, 4)
            .u8(frac)
            .u8(u8::from(fin))
    }
    fn peer_data_over(&mut self, known: u8, over: u8) -> &mut Self {
        self.op(1).known(known).variant(1, 4).u8(over).u8(0)
    }
    fn peer_window(&mut self, local: u8, inc: u16, session: bool) -> &mut Self {
        self.op(2)
            .local(local)
            .variant(0, 2)
            .u16(inc)
            .u8(u8::from(session))
    }
    fn peer_reset(&mut self, known: u8) -> &mut Self {
        self.op(3).known(known)
    }
    fn peer_ping_burst(&mut self, n: u16) -> &mut Self {
        self.op(5).u16(n)
    }
    fn open_local(&mut self) -> &mut Self {
        self.op(6)
    }
    fn send(&mut self, local: u8, n: u16) -> &mut Self {
        self.op(7).local(local).u16(n)
    }
    fn consume(&mut self, known: u8, n: u16, rtt_ms: u8) -> &mut Self {
        self.op(8).known(known).u16(n).u8(rtt_ms)
    }
    fn finish_local_known(&mut self, known: u8) -> &mut Self {
        self.op(9).known(known)
    }
    fn finish_remote_consumed(&mut self, known: u8) -> &mut Self {
        self.op(10).known(known)
    }
    fn remove(&mut self, known: u8) -> &mut Self {
        self.op(11).known(known)
    }
    fn advance(&mut self, ms: u16) -> &mut Self {
        self.op(12).u16(ms)
    }
    fn done(&mut self) -> Vec<u8> {
        self.u8(0);
        std::mem::take(&mut self.0)
    }
}

/// Input header: 2 KiB stream window growing to 6 KiB, 8 KiB session, 4 streams.
fn mux_input() -> Ops {
    let mut o = Ops::default();
    o.u8(1).u8(4).u8(6).u8(3);
    o
}

fn mux() {
    // The peer opens a stream and fills the window; we consume fast so it grows, then the
    // peer overruns by one byte.
    let mut o = mux_input();
    o.peer_open()
        .peer_data_fraction(0, 255, false)
        .consume(0, 4096, 50)
        .peer_data_fraction(0, 255, false)
        .consume(0, 4096, 50)
        .peer_data_fraction(0, 255, false)
        .consume(0, 4096, 50)
        .peer_data_over(0, 1);
    write("mux", "recv-window-grows", &o.done());

    // We open a stream, send all credit, get more, finish; the peer finishes too.
    let mut o = mux_input();
    o.open_local()
        .send(1, 65_535)
        .peer_window(1, 1000, false)
        .peer_window(0, 1000, true)
        .send(1, 65_535)
        .finish_local_known(0)
        .peer_data_fraction(0, 10, true)
        .consume(0, 65_535, 0)
        .finish_remote_consumed(0);
    write("mux", "send-and-finish", &o.done());

    // More opens than max_streams; resets, removal with buffered data, late data.
    let mut o = mux_input();
    for _ in 0..5 {
        o.peer_open();
    }
    o.peer_data_fraction(1, 128, false)
        .remove(1)
        .peer_data_fraction(1, 20, false)
        .peer_reset(2)
        .peer_data_fraction(2, 20, false)
        .advance(1000);
    write("mux", "limits-and-resets", &o.done());

    // A control-frame flood.
    let mut o = mux_input();
    o.peer_ping_burst(30_000).peer_ping_burst(30_000);
    write("mux", "ping-flood", &o.done());
}

/// The example config files without their comments, plus single values and small snippets.
fn config() {
    let strip = |text: &str| -> String {
        text.lines()
            .map(|l| match l.find(" #") {
                Some(i) if !l.trim_start().starts_with('#') => l[..i].trim_end(),
                _ => l,
            })
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .map(|l| format!("{l}\n"))
            .collect()
    };
    write(
        "config",
        "gateway.toml",
        strip(include_str!("../../examples/gateway.toml")).as_bytes(),
    );
    write(
        "config",
        "agent.toml",
        strip(include_str!("../../examples/agent.toml")).as_bytes(),
    );
    let snippets: &[(&str, &str)] = &[
        ("forward", "8080=127.0.0.1:80"),
        ("forward-unix", "unix:/run/app.sock"),
        ("target-v6", "[::1]:3000"),
        ("range", "9000-9100"),
        ("duration", "1h 30m"),
        ("gateway-addr", "gw.example.com:7443"),
        ("transport", "tcp"),
        ("limits", "[limits]\nmax_frame = 1024\nstream_window = 1024\nsession_window = 1024\n"),
        ("heartbeat", "[heartbeat]\ninterval = \"50ms\"\nmisses = 1\n"),
        (
            "agents",
            "[[agents]]\nname = \"a\"\nkey_hash = \"bkh_tjpv6pJLLHVz98RUc4z1VaSnbUDW0Nm1UIIbnZ4xzos\"\nports = [1, \"2-3\"]\n",
        ),
        ("agent-tcp", "gateway = \"h:1\"\ntransport = \"tcp\"\nforward = [\"1=a:2\"]\n"),
        ("syntax-error", "listen = \n\u{e9} = 1\n"),
    ];
    for (name, text) in snippets {
        write("config", name, text.as_bytes());
    }
}

fn main() {
    frame_decoder();
    messages();
    mux();
    config();
}
