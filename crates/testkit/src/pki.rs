//! A throwaway certificate authority for tests: a CA and leaf certificates for `localhost`,
//! as PEM files in a temporary directory (what a reverse proxy in front of a gateway serves,
//! and what an agent's `--ca` names).

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};

use crate::{Error, Result};

/// A CA whose files live as long as it does.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Unexpected(format!("test PKI: {e}"))
}

impl Pki {
    /// A new CA named `name`; its certificate is written to [`Pki::ca_file`].
    pub fn new(name: &str) -> Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let ca = params.self_signed(&ca_key).map_err(err)?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        Ok(Pki { dir, ca, ca_key })
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a server certificate for `localhost` and `127.0.0.1`; writes `<file>.crt`
    /// (leaf, then CA) and `<file>.key` and returns their paths.
    pub fn issue(&self, file: &str) -> Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).map_err(err)?;
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let leaf = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .map_err(err)?;
        let cert_path = self.dir.path().join(format!("{file}.crt"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_path, format!("{}{}", leaf.pem(), self.ca.pem()))?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }
}
