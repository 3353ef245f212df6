//! TLS for the tunnel: the gateway's identity and the agent's verifiers.
//!
//! The gateway either keeps a self-signed certificate in its state directory
//! ([`load_or_create_identity`]) and prints its fingerprint, or serves a CA-signed chain
//! ([`load_identity_files`]). The agent either pins that fingerprint or trusts a CA bundle
//! ([`client_config`]). Both sides speak TLS 1.3 only, with ALPN [`ALPN`], on the ring
//! provider built here (never a process-wide default provider).
//!
//! After the handshake both sides derive the same 32-byte [channel binding](channel_binding)
//! from the TLS exporter; the key proof signs it, so a proof is tied to this very connection.

use std::fs::File;
use std::io::{self, BufReader};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::config::Trust;
use crate::state;

/// The ALPN protocol both sides offer. The gateway also takes `http/1.1` (WebSocket upgrades
/// from HTTP clients); a peer that offers neither is refused.
pub const ALPN: &[u8] = b"burrow/1";
/// File name of the self-signed certificate inside the state directory.
pub const CERT_FILE: &str = "gateway.crt";
/// File name of the self-signed certificate's private key inside the state directory.
pub const KEY_FILE: &str = "gateway.key";
/// How long a generated certificate is valid. Agents pin it by fingerprint and do not check
/// its dates, so this only matters to other tools that look at it.
const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(3653 * 24 * 60 * 60);

/// Errors loading or making certificates, phrased for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// What the gateway serves: its rustls config and the fingerprint of its certificate.
#[derive(Clone)]
pub struct GatewayIdentity {
    /// Ready-made rustls server config (TLS 1.3 only).
    pub server_config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the leaf certificate (DER).
    pub fingerprint: [u8; 32],
}

impl std::fmt::Debug for GatewayIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayIdentity")
            .field("fingerprint", &fingerprint_string(&self.fingerprint))
            .finish_non_exhaustive()
    }
}

/// `SHA256:<64 lowercase hex>`.
pub fn fingerprint_string(fp: &[u8; 32]) -> String {
    let hex: String = fp.iter().map(|b| format!("{b:02x}")).collect();
    format!("SHA256:{hex}")
}

/// SHA-256 of a certificate's DER encoding, as printed by [`fingerprint_string`].
pub fn fingerprint_of(cert_der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Parses `SHA256:<hex>` (case-insensitive, colons between bytes allowed).
///
/// Accepted: `SHA256:` (any case, may be left out) followed by 64 hex digits (any case),
/// either all run together or as 32 pairs separated by `:`.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], TlsError> {
    let bad = |what: &str| {
        TlsError(format!(
            "not a certificate fingerprint ({what}): expected `SHA256:` followed by 64 hex \
             digits, colons between byte pairs allowed; copy it from the gateway, which prints \
             it at start"
        ))
    };
    let s = s.trim();
    let body = match s.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &s[7..],
        _ => s,
    };
    let pairs: Vec<&str> = if body.contains(':') {
        body.split(':').collect()
    } else {
        if !body.is_ascii() {
            return Err(bad("it holds characters that are not hex digits"));
        }
        // ASCII, so every two bytes are two characters.
        body.as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap_or(""))
            .collect()
    };
    let digits: usize = pairs.iter().map(|p| p.len()).sum();
    if digits != 64 {
        return Err(bad(&format!(
            "{digits} characters where 64 hex digits belong"
        )));
    }
    if pairs.len() != 32 {
        return Err(bad("colons must separate every byte pair"));
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(&pairs) {
        if pair.len() != 2 || !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(&format!("`{pair}` is not a hex byte")));
        }
        *byte = u8::from_str_radix(pair, 16).map_err(|_| bad("bad hex digit"))?;
    }
    Ok(out)
}

/// Loads the self-signed certificate from `state_dir`, or makes and stores one.
///
/// The certificate lives in `state_dir/gateway.crt` and its key in `state_dir/gateway.key`
/// (PEM, mode `0600`; `state_dir` is created `0700` if missing). When both exist they are
/// loaded as they are, so a restart keeps the fingerprint agents have pinned, even if `names`
/// changed since. When neither exists, a new ECDSA P-256 certificate valid for ten years is
/// made for `names` (IP addresses become IP SANs, anything else a DNS name; `localhost` is
/// always added). When only one of them exists, or either cannot be read, the error names the
/// file and what to do.
pub fn load_or_create_identity(
    state_dir: &Path,
    names: &[String],
) -> Result<GatewayIdentity, TlsError> {
    let cert_path = state_dir.join(CERT_FILE);
    let key_path = state_dir.join(KEY_FILE);
    let exists = |p: &Path| {
        p.try_exists()
            .map_err(|e| TlsError(format!("cannot look for {}: {e}", p.display())))
    };
    let renew = format!(
        "delete {} and {} to make a new certificate (agents will then need the new fingerprint)",
        cert_path.display(),
        key_path.display()
    );
    let (cert_exists, key_exists) = (exists(&cert_path)?, exists(&key_path)?);
    match (cert_exists, key_exists) {
        (true, true) => {
            let chain = read_certs(&cert_path, &renew)?;
            let key = read_key(&key_path, &renew)?;
            state::warn_if_readable_by_others(&key_path);
            identity(chain, key, &cert_path, &key_path, &renew)
        }
        (false, false) => create_identity(state_dir, names, &cert_path, &key_path),
        (true, false) | (false, true) => {
            let (present, missing) = if cert_exists {
                (&cert_path, &key_path)
            } else {
                (&key_path, &cert_path)
            };
            Err(TlsError(format!(
                "{} exists but {} is missing: restore it, or delete {} to make a new \
                 certificate (agents will then need the new fingerprint)",
                present.display(),
                missing.display(),
                present.display()
            )))
        }
    }
}

fn create_identity(
    state_dir: &Path,
    names: &[String],
    cert_path: &Path,
    key_path: &Path,
) -> Result<GatewayIdentity, TlsError> {
    let mut sans: Vec<String> = Vec::new();
    for name in names.iter().map(|n| n.trim()).chain(["localhost"]) {
        // Accept `[::1]` as written in a socket address.
        let name = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name);
        if !name.is_empty() && !sans.iter().any(|s| s.eq_ignore_ascii_case(name)) {
            sans.push(name.to_owned());
        }
    }
    let mut params = rcgen::CertificateParams::new(sans.clone()).map_err(|e| {
        TlsError(format!(
            "cannot make a certificate for the names {}: {e}",
            sans.join(", ")
        ))
    })?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "burrow gateway");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| TlsError("the system clock is before 1970: set the clock".into()))?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    // A day of slack for peers whose clocks run behind.
    params.not_before = epoch + now.saturating_sub(Duration::from_secs(24 * 60 * 60));
    params.not_after = epoch + now + SELF_SIGNED_VALIDITY;

    let failed = |e: rcgen::Error| TlsError(format!("cannot make a certificate: {e}"));
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(failed)?;
    let cert = params.self_signed(&key_pair).map_err(failed)?;

    let written = |e: io::Error| TlsError(format!("cannot store the new certificate: {e}"));
    state::ensure_private_dir(state_dir).map_err(written)?;
    // Key first: a crash in between leaves a key without a certificate, which is reported,
    // never a certificate whose key is lost.
    state::write_private_file(key_path, key_pair.serialize_pem().as_bytes()).map_err(written)?;
    state::write_private_file(cert_path, cert.pem().as_bytes()).map_err(written)?;

    let key = PrivateKeyDer::Pkcs8(key_pair.serialize_der().into());
    let renew = format!(
        "delete {} and {} to make a new certificate",
        cert_path.display(),
        key_path.display()
    );
    identity(vec![cert.der().clone()], key, cert_path, key_path, &renew)
}

/// Loads a CA-signed certificate chain and its key (PEM files).
///
/// `cert` holds the leaf certificate first, then any intermediates; `key` holds its private
/// key as PKCS#8, PKCS#1 (RSA) or SEC1 (EC). The fingerprint is that of the leaf, for agents
/// that would rather pin it than trust the CA.
pub fn load_identity_files(cert: &Path, key: &Path) -> Result<GatewayIdentity, TlsError> {
    let hint = "give the PEM certificate chain (leaf first) and its private key";
    let chain = read_certs(cert, hint)?;
    let key_der = read_key(key, hint)?;
    state::warn_if_readable_by_others(key);
    identity(chain, key_der, cert, key, hint)
}

fn identity(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
    hint: &str,
) -> Result<GatewayIdentity, TlsError> {
    let fingerprint = match chain.first() {
        Some(leaf) => fingerprint_of(leaf),
        None => {
            return Err(TlsError(format!(
                "{} holds no certificate",
                cert_path.display()
            )))
        }
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(format!("cannot set up TLS 1.3: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            TlsError(format!(
                "cannot use the key {} with the certificate {}: {e}; {hint}",
                key_path.display(),
                cert_path.display()
            ))
        })?;
    // HTTP/1.1 too, so that a browser or curl pointed at the tunnel port negotiates TLS and
    // gets an HTTP answer (a WebSocket upgrade, or an error status) instead of a TLS alert.
    config.alpn_protocols = vec![ALPN.to_vec(), b"http/1.1".to_vec()];
    Ok(GatewayIdentity {
        server_config: Arc::new(config),
        fingerprint,
    })
}

/// The agent's rustls client config for `trust` (not for [`Trust::Plain`]).
///
/// - [`Trust::Fingerprint`]: the gateway is accepted only if the SHA-256 of its leaf
///   certificate equals the pin. Names, issuer and dates are not checked (the pin says it
///   all), but the handshake signature is, so only the holder of the key gets through. Any
///   [`ServerName`] will do for the connect call: use [`server_name`] on the host dialed. On a
///   mismatch the handshake fails with a `CertificateUnknown` alert to the gateway and an
///   error that reads `invalid peer certificate: Other(OtherError(gateway certificate
///   fingerprint is SHA256:<actual>, expected SHA256:<pinned>: check --fingerprint (the
///   gateway prints its fingerprint at start)))`; [`describe_handshake_error`] returns just
///   the part from `gateway certificate`. A server showing the pinned certificate without
///   its key fails with `invalid peer certificate: BadSignature`.
/// - [`Trust::Ca`]: the PEM bundle at the path is the only set of roots, with standard WebPKI
///   verification, so the server name passed to connect must be one the certificate names.
///   Failures read as rustls words them, for example `invalid peer certificate:
///   UnknownIssuer` (not signed by that CA), `invalid peer certificate: certificate expired:
///   verification time ... but certificate is not valid after ...`, or `invalid peer
///   certificate: certificate not valid for name "x"; certificate is only valid for ...`.
///   [`describe_handshake_error`] adds what to do.
/// - [`Trust::Plain`]: an error, as plain TCP needs no TLS config.
pub fn client_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError(format!("cannot set up TLS 1.3: {e}")))?;
    let mut config = match trust {
        Trust::Fingerprint(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCertVerifier {
                pin: *pin,
                algorithms,
            }))
            .with_no_client_auth(),
        Trust::Ca(path) => {
            let hint = "give a PEM file holding the CA certificate(s) that signed the gateway's \
                        certificate";
            let mut roots = rustls::RootCertStore::empty();
            for (i, cert) in read_certs(path, hint)?.into_iter().enumerate() {
                roots.add(cert).map_err(|e| {
                    TlsError(format!(
                        "{}: certificate {} is not usable as a CA: {e}; {hint}",
                        path.display(),
                        i + 1
                    ))
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::System => {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_string(), |e| e.to_string());
                return Err(TlsError(format!(
                    "--ca system: no usable CA certificates in the system's trust store ({why}); \
                     install the ca-certificates package, or give --ca FILE"
                )));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Plain => {
            return Err(TlsError(
                "plain TCP transport needs no TLS config: dial without TLS".into(),
            ))
        }
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The [`ServerName`] to connect with for `host` (a DNS name or an IP address, `[v6]`
/// brackets allowed). An IP address sends no SNI.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_owned()).map_err(|_| {
        TlsError(format!(
            "`{host}` is not a valid TLS server name: give a DNS name or an IP address"
        ))
    })
}

/// The handshake error `err` (from a tokio-rustls connect) in words for the user: rustls'
/// own text, with what to do added for the common certificate failures, and the plain
/// message for a fingerprint mismatch (whose raw text rustls wraps in
/// `invalid peer certificate: Other(OtherError(...))`).
pub fn describe_handshake_error(err: &io::Error, trust: &Trust) -> String {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return err.to_string();
    };
    let rustls::Error::InvalidCertificate(cert_err) = tls else {
        return err.to_string();
    };
    let advice = match (cert_err, trust) {
        (CertificateError::Other(other), _) => {
            if let Some(mismatch) = other.0.downcast_ref::<FingerprintMismatch>() {
                return mismatch.0.clone();
            }
            return err.to_string();
        }
        (CertificateError::BadSignature, Trust::Fingerprint(_)) => {
            "the gateway showed the pinned certificate but could not prove it holds its key: \
             something is impersonating the gateway"
                .into()
        }
        (CertificateError::UnknownIssuer, Trust::System) => {
            "the certificate is not signed by a CA in the system's trust store: give the CA \
             with --ca FILE, or pin the gateway's fingerprint instead"
                .to_string()
        }
        (CertificateError::UnknownIssuer, Trust::Ca(path)) => format!(
            "the gateway's certificate is not signed by a CA in {}: check --ca, or pin the \
             gateway's fingerprint instead",
            path.display()
        ),
        (CertificateError::Expired | CertificateError::ExpiredContext { .. }, _) => {
            "the gateway's certificate has expired: renew it on the gateway (or check this \
             machine's clock)"
                .into()
        }
        (CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }, _) => {
            "the gateway's certificate is not valid yet: check this machine's clock".into()
        }
        (
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            _,
        ) => "the gateway's certificate does not name the host dialed: set --server-name to a \
              name the certificate holds"
            .into(),
        _ => return err.to_string(),
    };
    format!("{advice} ({tls})")
}

/// The 32-byte channel binding of an established TLS connection: the TLS exporter value for
/// [`burrow_proto::auth::EXPORTER_LABEL`] with no context. Both ends of one connection get
/// the same value; any other connection gets a different one.
pub fn channel_binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<[u8; 32], TlsError> {
    conn.export_keying_material([0u8; 32], burrow_proto::auth::EXPORTER_LABEL, None)
        .map_err(|e| TlsError(format!("cannot derive the TLS channel binding: {e}")))
}

/// [`channel_binding`] of the gateway's side of a connection.
pub fn channel_binding_server<T>(
    s: &tokio_rustls::server::TlsStream<T>,
) -> Result<[u8; 32], TlsError> {
    channel_binding(s.get_ref().1)
}

/// [`channel_binding`] of the agent's side of a connection.
pub fn channel_binding_client<T>(
    s: &tokio_rustls::client::TlsStream<T>,
) -> Result<[u8; 32], TlsError> {
    channel_binding(s.get_ref().1)
}

/// The crypto provider every config here is built on: ring's, with the TLS 1.3 suites in
/// the order we prefer. AES-128-GCM comes first: it runs 10 AES rounds per block against
/// AES-256's 14, and record encryption is the largest single cost of moving bulk data
/// (a quarter of the gateway's CPU when it was AES-256). Both keep a security margin far
/// beyond a session's lifetime; ChaCha20-Poly1305 stays for peers without AES instructions.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// The fingerprint of the first certificate in the PEM file `cert` (the leaf), without
/// loading or making anything else.
pub fn fingerprint_of_file(cert: &Path) -> Result<[u8; 32], TlsError> {
    let chain = read_certs(cert, "give the gateway's PEM certificate (leaf first)")?;
    Ok(fingerprint_of(&chain[0]))
}

fn open(path: &Path, what: &str) -> Result<BufReader<File>, TlsError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| TlsError(format!("cannot read {what} {}: {e}", path.display())))
}

fn read_certs(path: &Path, hint: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(path, "certificate file")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError(format!(
                "{} is not a valid PEM file: {e}; {hint}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{} holds no certificate (no `-----BEGIN CERTIFICATE-----` block); {hint}",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path, hint: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut open(path, "private key")?)
        .map_err(|e| {
            TlsError(format!(
                "{} is not a valid PEM file: {e}; {hint}",
                path.display()
            ))
        })?
        .ok_or_else(|| {
            TlsError(format!(
                "{} holds no private key (expected a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or \
                 `EC PRIVATE KEY` block); {hint}",
                path.display()
            ))
        })
}

/// Accepts exactly the certificate whose SHA-256 is `pin`, and checks the handshake signature
/// against it.
#[derive(Debug)]
struct PinnedCertVerifier {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = fingerprint_of(end_entity);
        // Fingerprints are not secret, but comparing in constant time costs nothing.
        let diff = actual
            .iter()
            .zip(&self.pin)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            return Ok(ServerCertVerified::assertion());
        }
        let message = format!(
            "gateway certificate fingerprint is {}, expected {}: check --fingerprint (the \
             gateway prints its fingerprint at start)",
            fingerprint_string(&actual),
            fingerprint_string(&self.pin)
        );
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(FingerprintMismatch(message))),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The pinned fingerprint did not match; the text says what to do.
///
/// rustls prints a [`CertificateError::Other`] with `Debug`, so `Debug` is the plain text too.
#[derive(thiserror::Error)]
#[error("{0}")]
struct FingerprintMismatch(String);

impl std::fmt::Debug for FingerprintMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: [u8; 32] = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54,
        0x32, 0x10,
    ];

    #[test]
    fn fingerprint_round_trips() -> Result<(), TlsError> {
        let s = fingerprint_string(&FP);
        assert_eq!(s.len(), 7 + 64);
        assert!(s.starts_with("SHA256:0011"));
        assert_eq!(parse_fingerprint(&s)?, FP);
        Ok(())
    }

    #[test]
    fn fingerprint_accepts_case_colons_and_no_prefix() -> Result<(), TlsError> {
        let s = fingerprint_string(&FP);
        assert_eq!(parse_fingerprint(&s.to_uppercase())?, FP);
        assert_eq!(parse_fingerprint(&format!("  sha256:{}\n", &s[7..]))?, FP);
        assert_eq!(parse_fingerprint(&s[7..])?, FP);
        let colons: Vec<String> = FP.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(
            parse_fingerprint(&format!("SHA256:{}", colons.join(":")))?,
            FP
        );
        assert_eq!(parse_fingerprint(&colons.join(":"))?, FP);
        Ok(())
    }

    #[test]
    fn fingerprint_rejects_malformed() {
        let s = fingerprint_string(&FP);
        let hex = &s[7..];
        let bad = [
            String::new(),
            "SHA256:".into(),
            s[..s.len() - 2].to_string(),
            format!("{s}00"),
            format!("SHA256:{}zz", &hex[2..]),
            format!("MD5:{hex}"),
            // Colons in the wrong places.
            format!("SHA256:{}:{}", &hex[..3], &hex[3..]),
            format!("SHA256:{hex}:"),
            format!("SHA256:{}é", &hex[1..]),
        ];
        for input in bad {
            let err = match parse_fingerprint(&input) {
                Ok(_) => panic!("accepted {input:?}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains("expected `SHA256:`"), "{err}");
            assert!(err.contains("prints it at start"), "{err}");
        }
    }

    #[test]
    fn server_name_takes_hosts_and_ips() -> Result<(), TlsError> {
        assert!(matches!(
            server_name("127.0.0.1")?,
            ServerName::IpAddress(_)
        ));
        assert!(matches!(server_name("[::1]")?, ServerName::IpAddress(_)));
        assert!(matches!(
            server_name("gw.example.com")?,
            ServerName::DnsName(_)
        ));
        assert!(server_name("not a name").is_err());
        Ok(())
    }

    #[test]
    fn plain_trust_has_no_client_config() {
        let err = match client_config(&Trust::Plain) {
            Ok(_) => panic!("plain TCP got a TLS config"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("plain TCP"), "{err}");
    }

    #[test]
    fn half_a_state_dir_is_reported() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        let made = load_or_create_identity(tmp.path(), &[])?;
        std::fs::remove_file(tmp.path().join(CERT_FILE))?;
        let err = match load_or_create_identity(tmp.path(), &[]) {
            Ok(_) => panic!("a key without its certificate was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(CERT_FILE) && err.contains("missing"), "{err}");
        assert!(err.contains("new fingerprint"), "{err}");
        let _ = made;
        Ok(())
    }

    #[test]
    fn corrupt_key_file_is_reported() -> Result<(), Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        load_or_create_identity(tmp.path(), &[])?;
        let key_path = tmp.path().join(KEY_FILE);
        std::fs::write(&key_path, "not a key\n")?;
        let err = match load_or_create_identity(tmp.path(), &[]) {
            Ok(_) => panic!("a corrupt key was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&key_path.display().to_string()), "{err}");
        assert!(err.contains("delete"), "{err}");
        assert!(err.contains("new fingerprint"), "{err}");
        Ok(())
    }

    #[test]
    fn mismatched_key_is_reported() -> Result<(), Box<dyn std::error::Error>> {
        let a = tempfile::tempdir()?;
        let b = tempfile::tempdir()?;
        load_or_create_identity(a.path(), &[])?;
        load_or_create_identity(b.path(), &[])?;
        std::fs::copy(b.path().join(KEY_FILE), a.path().join(KEY_FILE))?;
        let err = match load_or_create_identity(a.path(), &[]) {
            Ok(_) => panic!("a key of another certificate was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(KEY_FILE) && err.contains(CERT_FILE), "{err}");
        Ok(())
    }
}
