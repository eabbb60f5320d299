//! Certificates for one control plane: a CA, the API server's serving
//! certificate, client certificates, and the service-account signing key.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::Result;

/// A certificate (or public key) and its private key, PEM encoded.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// The cluster's certificate authority.
pub struct Authority {
    pub pem: Pem,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    pub fn new() -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "tidepool-harness-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pem = Pem { cert: cert.pem(), key: key.serialize_pem() };
        Ok(Self { pem, issuer: Issuer::new(params, key) })
    }

    /// A serving certificate for the given DNS names and IP addresses.
    pub fn server(&self, names: &[&str]) -> Result<Pem> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("server"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate: Kubernetes takes the user from the common name and
    /// the groups from the organisations.
    pub fn client(&self, user: &str, groups: &[&str]) -> Result<Pem> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        for group in groups {
            params.distinguished_name.push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<Pem> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
    }
}

/// An ECDSA P-256 key for signing service-account tokens (ES256), as the
/// private key and the public key that verifies its tokens.
pub fn signing_key() -> Result<Pem> {
    let key = KeyPair::generate()?;
    Ok(Pem { cert: key.public_key_pem(), key: key.serialize_pem() })
}
