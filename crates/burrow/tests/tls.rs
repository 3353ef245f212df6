//! Real TLS 1.3 handshakes over loopback TCP: the gateway's identities against the agent's
//! verifiers, and the channel binding both ends derive.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use burrow::config::Trust;
use burrow::tls::{self, GatewayIdentity};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Upper bound on any one exchange, so a broken handshake fails the test instead of hanging.
const LIMIT: Duration = Duration::from_secs(10);

/// A gateway that accepts one connection, echoes a ping and returns its channel binding.
async fn serve_once(identity: &GatewayIdentity) -> Result<(String, JoinHandle<Result<[u8; 32]>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let acceptor = TlsAcceptor::from(identity.server_config.clone());
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(tls::ALPN));
        let binding = tls::channel_binding_server(&tls)?;
        let mut ping = [0u8; 4];
        tls.read_exact(&mut ping).await?;
        tls.write_all(&ping).await?;
        tls.flush().await?;
        Ok(binding)
    });
    Ok((addr, task))
}

/// An agent connecting to `addr` with `trust`, sending `name` as the server name. Returns the
/// channel binding, or the handshake error as the agent would show it.
async fn connect(addr: &str, trust: &Trust, name: &str) -> Result<[u8; 32], std::io::Error> {
    let config = tls::client_config(trust).map_err(std::io::Error::other)?;
    let server_name = tls::server_name(name).map_err(std::io::Error::other)?;
    let tcp = TcpStream::connect(addr).await?;
    let mut stream = TlsConnector::from(config).connect(server_name, tcp).await?;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(tls::ALPN));
    // Both ends prefer AES-128-GCM (the cheapest suite to move bulk data with).
    assert_eq!(
        stream
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    let binding = tls::channel_binding_client(&stream).map_err(std::io::Error::other)?;
    stream.write_all(b"ping").await?;
    let mut pong = [0u8; 4];
    stream.read_exact(&mut pong).await?;
    assert_eq!(&pong, b"ping");
    Ok(binding)
}

/// Connects and expects success with equal bindings on both ends.
async fn connect_ok(identity: &GatewayIdentity, trust: &Trust, name: &str) -> Result<[u8; 32]> {
    let (addr, server) = serve_once(identity).await?;
    let client = tokio::time::timeout(LIMIT, connect(&addr, trust, name))
        .await
        .context("handshake timed out")?
        .context("agent handshake")?;
    let server = tokio::time::timeout(LIMIT, server)
        .await
        .context("gateway timed out")???;
    assert_eq!(
        client, server,
        "both ends must derive the same channel binding"
    );
    Ok(client)
}

/// Connects and expects the handshake to fail; returns the agent's error.
async fn connect_err(
    identity: &GatewayIdentity,
    trust: &Trust,
    name: &str,
) -> Result<std::io::Error> {
    let (addr, server) = serve_once(identity).await?;
    let client = tokio::time::timeout(LIMIT, connect(&addr, trust, name))
        .await
        .context("handshake timed out")?;
    // The gateway sees the agent's alert and fails too; only that it ends matters here.
    let server = tokio::time::timeout(LIMIT, server)
        .await
        .context("gateway timed out")??;
    match client {
        Ok(_) => bail!("handshake succeeded but should have failed"),
        Err(e) => {
            assert!(
                server.is_err(),
                "the gateway must not complete the exchange"
            );
            Ok(e)
        }
    }
}

#[cfg(unix)]
fn mode(path: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

#[test]
fn self_signed_identity_is_kept_across_restarts() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("state");
    let names = vec!["gw.example.com".to_string(), "203.0.113.5".to_string()];
    let first = tls::load_or_create_identity(&dir, &names)?;
    let second = tls::load_or_create_identity(&dir, &names)?;
    assert_eq!(first.fingerprint, second.fingerprint);
    // Changing the names later does not replace the certificate agents have pinned.
    let third = tls::load_or_create_identity(&dir, &[])?;
    assert_eq!(first.fingerprint, third.fingerprint);

    // The fingerprint is the SHA-256 of the stored certificate's DER, checked independently.
    let pem = std::fs::read(dir.join(tls::CERT_FILE))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .context("no certificate in gateway.crt")??;
    let digest: [u8; 32] = sha2::Sha256::digest(der.as_ref()).into();
    assert_eq!(digest, first.fingerprint);

    #[cfg(unix)]
    {
        assert_eq!(mode(&dir.join(tls::KEY_FILE))?, 0o600);
        assert_eq!(mode(&dir)?, 0o700);
    }
    // Another directory makes another certificate.
    let other = tls::load_or_create_identity(&tmp.path().join("other"), &names)?;
    assert_ne!(other.fingerprint, first.fingerprint);
    Ok(())
}

#[tokio::test]
async fn pinned_fingerprint_connects_and_binds_the_connection() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let identity = tls::load_or_create_identity(tmp.path(), &[])?;
    let trust = Trust::Fingerprint(identity.fingerprint);
    // The pin ignores the name: an IP (no SNI) and a name the certificate lacks both work.
    let one = connect_ok(&identity, &trust, "127.0.0.1").await?;
    let two = connect_ok(&identity, &trust, "gateway.invalid").await?;
    assert_ne!(
        one, two,
        "each connection must have its own channel binding"
    );
    Ok(())
}

#[tokio::test]
async fn wrong_fingerprint_is_refused_with_a_useful_message() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let identity = tls::load_or_create_identity(tmp.path(), &[])?;
    let mut pin = identity.fingerprint;
    pin[0] ^= 1;
    let err = connect_err(&identity, &Trust::Fingerprint(pin), "127.0.0.1").await?;
    let text = err.to_string();
    assert!(text.contains("fingerprint"), "{text}");
    assert!(
        text.contains(&tls::fingerprint_string(&identity.fingerprint)),
        "{text}"
    );
    assert!(text.contains(&tls::fingerprint_string(&pin)), "{text}");
    assert!(text.contains("--fingerprint"), "{text}");
    // Described, it is just the message, without rustls' wrapping.
    let described = tls::describe_handshake_error(&err, &Trust::Fingerprint(pin));
    assert_eq!(
        described,
        format!(
            "gateway certificate fingerprint is {}, expected {}: check --fingerprint (the \
             gateway prints its fingerprint at start)",
            tls::fingerprint_string(&identity.fingerprint),
            tls::fingerprint_string(&pin)
        )
    );
    Ok(())
}

#[tokio::test]
async fn a_certificate_of_the_same_key_but_another_fingerprint_is_refused() -> Result<()> {
    // Pinning is on the certificate, not only the key: a re-issued certificate needs a new pin.
    let tmp = tempfile::tempdir()?;
    let identity = tls::load_or_create_identity(tmp.path(), &[])?;
    let key_pem = std::fs::read_to_string(tmp.path().join(tls::KEY_FILE))?;
    let key = KeyPair::from_pem(&key_pem)?;
    let cert = CertificateParams::new(vec!["localhost".to_string()])?.self_signed(&key)?;
    std::fs::write(tmp.path().join(tls::CERT_FILE), cert.pem())?;
    let reissued = tls::load_or_create_identity(tmp.path(), &[])?;
    assert_ne!(reissued.fingerprint, identity.fingerprint);
    let err = connect_err(
        &reissued,
        &Trust::Fingerprint(identity.fingerprint),
        "localhost",
    )
    .await?;
    assert!(err.to_string().contains("fingerprint"), "{err}");
    Ok(())
}

/// Year, month, day.
type Ymd = (i32, u8, u8);

/// A CA and the PEM files a gateway and agent would be given.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(name: &str) -> Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let ca = params.self_signed(&ca_key)?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        Ok(Pki { dir, ca, ca_key })
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a leaf for `localhost`, optionally with explicit validity dates, and writes
    /// `<file>.crt` (leaf then CA) and `<file>.key`.
    fn issue(&self, file: &str, validity: Option<(Ymd, Ymd)>) -> Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        if let Some((from, until)) = validity {
            params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
            params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&key, &self.ca, &self.ca_key)?;
        let cert_path = self.dir.path().join(format!("{file}.crt"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_path, format!("{}{}", leaf.pem(), self.ca.pem()))?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }
}

#[tokio::test]
async fn ca_signed_gateway_is_trusted_through_its_ca() -> Result<()> {
    let pki = Pki::new("good")?;
    let (cert, key) = pki.issue("gateway", None)?;
    let identity = tls::load_identity_files(&cert, &key)?;
    let trust = Trust::Ca(pki.ca_file());
    let one = connect_ok(&identity, &trust, "localhost").await?;
    let two = connect_ok(&identity, &trust, "localhost").await?;
    assert_ne!(one, two);
    // The leaf's fingerprint can be pinned instead of trusting the CA.
    connect_ok(
        &identity,
        &Trust::Fingerprint(identity.fingerprint),
        "localhost",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn another_ca_is_refused() -> Result<()> {
    let pki = Pki::new("good")?;
    let other = Pki::new("other")?;
    let (cert, key) = pki.issue("gateway", None)?;
    let identity = tls::load_identity_files(&cert, &key)?;
    let trust = Trust::Ca(other.ca_file());
    let err = connect_err(&identity, &trust, "localhost").await?;
    let text = err.to_string();
    assert!(
        text.contains("invalid peer certificate: UnknownIssuer"),
        "{text}"
    );
    let described = tls::describe_handshake_error(&err, &trust);
    assert!(described.contains("not signed by a CA in"), "{described}");
    assert!(
        described.contains(&other.ca_file().display().to_string()),
        "{described}"
    );
    assert!(described.contains("UnknownIssuer"), "{described}");
    Ok(())
}

#[tokio::test]
async fn expired_certificate_is_refused() -> Result<()> {
    let pki = Pki::new("good")?;
    let (cert, key) = pki.issue("expired", Some(((2000, 1, 1), (2001, 1, 1))))?;
    let identity = tls::load_identity_files(&cert, &key)?;
    let trust = Trust::Ca(pki.ca_file());
    let err = connect_err(&identity, &trust, "localhost").await?;
    let text = err.to_string();
    assert!(text.contains("certificate expired"), "{text}");
    let described = tls::describe_handshake_error(&err, &trust);
    assert!(described.contains("has expired: renew it"), "{described}");
    Ok(())
}

#[tokio::test]
async fn a_name_the_certificate_lacks_is_refused() -> Result<()> {
    let pki = Pki::new("good")?;
    let (cert, key) = pki.issue("gateway", None)?;
    let identity = tls::load_identity_files(&cert, &key)?;
    let trust = Trust::Ca(pki.ca_file());
    let err = connect_err(&identity, &trust, "127.0.0.1").await?;
    let text = err.to_string();
    assert!(text.contains("not valid for name"), "{text}");
    let described = tls::describe_handshake_error(&err, &trust);
    assert!(described.contains("--server-name"), "{described}");
    Ok(())
}

#[test]
fn unusable_files_are_named() -> Result<()> {
    let pki = Pki::new("good")?;
    let (cert, key) = pki.issue("gateway", None)?;
    let missing = pki.dir.path().join("missing.pem");
    let empty = pki.dir.path().join("empty.pem");
    std::fs::write(&empty, "nothing here\n")?;

    let check = |result: Result<GatewayIdentity, tls::TlsError>, file: &Path| match result {
        Ok(_) => panic!("{} was accepted", file.display()),
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains(&file.display().to_string()), "{text}");
        }
    };
    check(tls::load_identity_files(&missing, &key), &missing);
    check(tls::load_identity_files(&empty, &key), &empty);
    check(tls::load_identity_files(&cert, &missing), &missing);
    check(tls::load_identity_files(&cert, &empty), &empty);
    // A key that belongs to another certificate.
    let (_, other_key) = pki.issue("other", None)?;
    check(tls::load_identity_files(&cert, &other_key), &other_key);

    for bundle in [&missing, &empty] {
        match tls::client_config(&Trust::Ca(bundle.clone())) {
            Ok(_) => panic!("{} was accepted as a CA bundle", bundle.display()),
            Err(e) => assert!(e.to_string().contains(&bundle.display().to_string()), "{e}"),
        }
    }
    Ok(())
}

#[test]
fn parse_fingerprint_forms() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let fp = tls::load_or_create_identity(tmp.path(), &[])?.fingerprint;
    let printed = tls::fingerprint_string(&fp);
    assert_eq!(tls::parse_fingerprint(&printed)?, fp);
    assert_eq!(tls::parse_fingerprint(&printed.to_uppercase())?, fp);
    let colons: Vec<String> = fp.iter().map(|b| format!("{b:02X}")).collect();
    assert_eq!(
        tls::parse_fingerprint(&format!("sha256:{}", colons.join(":")))?,
        fp
    );
    for short in [&printed[..printed.len() - 1], &printed[..20], "SHA256:abcd"] {
        let err = match tls::parse_fingerprint(short) {
            Ok(_) => bail!("accepted {short}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("64 hex digits"), "{err}");
        assert!(err.contains("gateway"), "{err}");
    }
    Ok(())
}

#[tokio::test]
async fn the_pinned_certificate_without_its_key_is_refused() -> Result<()> {
    // A server that presents the pinned certificate (public, anyone may copy it) but signs the
    // handshake with another key must fail: the pin is checked with the handshake signature.
    let real = tempfile::tempdir()?;
    let identity = tls::load_or_create_identity(real.path(), &[])?;
    let cert_pem = std::fs::read(real.path().join(tls::CERT_FILE))?;
    let cert = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .next()
        .context("no certificate")??;
    let thief = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signing_key =
        provider
            .key_provider
            .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(
                thief.serialize_der().into(),
            ))?;
    let certified = rustls::sign::CertifiedKey::new(vec![cert], signing_key);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![tls::ALPN.to_vec()];
    let impostor = GatewayIdentity {
        server_config: Arc::new(config),
        fingerprint: identity.fingerprint,
    };
    let err = connect_err(
        &impostor,
        &Trust::Fingerprint(identity.fingerprint),
        "localhost",
    )
    .await?;
    assert!(err.to_string().contains("BadSignature"), "{err}");
    let described = tls::describe_handshake_error(&err, &Trust::Fingerprint(identity.fingerprint));
    assert!(described.contains("impersonating"), "{described}");
    Ok(())
}
