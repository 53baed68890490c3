//! TLS and QUIC configuration of the data plane: node identities bound to self-signed libp2p-tls certificates,
//! verified on both sides; TLS 1.3 only, AES-128-GCM preferred, every config built on an explicit aws-lc-rs
//! provider (never the process default, which is ambiguous when both aws-lc-rs and ring are compiled in).
//!
//! Public so that benchmarks and tests can build a raw quinn connection with exactly the data plane's setup.

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result, anyhow};
use libp2p::PeerId;
use mirrormesh_proto::transfer::DATA_ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};

use super::{
    CONNECTION_RECEIVE_WINDOW, IDLE_TIMEOUT, REQUEST_CONNECTION_WINDOW, REQUEST_STREAM_WINDOW, SEND_WINDOW,
    STREAM_RECEIVE_WINDOW, STREAMS_PER_CONNECTION_MAX,
};
use crate::key::NodeKey;

/// Server name a client puts in its handshake. Nodes are identified by their certificate's peer id, not by name.
pub const SERVER_NAME: &str = "mirrormesh";

/// Signature schemes accepted for the handshake signature (libp2p-tls certificates carry ECDSA P-256 keys; the
/// others are what libp2p-tls can verify, in its preference order).
const VERIFY_SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA512,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA256,
];

/// The aws-lc-rs provider with the data plane's TLS 1.3 suites: AES-128-GCM first (QUIC's initial suite and the
/// cheapest with AES-NI), then AES-256-GCM, then ChaCha20-Poly1305.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(provider)
}

/// A node's TLS identity: a fresh certificate key, certified by the node key through the libp2p extension.
#[derive(Clone, Debug)]
pub struct Identity {
    certified: Arc<CertifiedKey>,
    provider: Arc<CryptoProvider>,
    peer: PeerId,
}

impl Identity {
    pub fn new(key: &NodeKey) -> Result<Self> {
        let provider = crypto_provider();
        let (cert, private) = libp2p_tls::certificate::generate(key.keypair())
            .map_err(|e| anyhow!("generating the data-plane certificate: {e}"))?;
        // Not `CertifiedKey::from_der`: its consistency check parses the certificate with webpki, which refuses the
        // critical libp2p extension. The key and certificate come from the same `generate` call.
        let signing = provider
            .key_provider
            .load_private_key(private)
            .map_err(|e| anyhow!("loading the data-plane certificate key: {e}"))?;
        let certified = CertifiedKey::new(vec![cert], signing);
        Ok(Self { certified: Arc::new(certified), provider, peer: key.peer_id() })
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer
    }
}

/// The peer id a certificate proves, checking what libp2p-tls requires: exactly one certificate, self-signed,
/// currently valid, carrying a libp2p extension signed by the identity key.
fn certificate_peer(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<PeerId, rustls::Error> {
    if !intermediates.is_empty() {
        return Err(rustls::Error::General("a node must present exactly one certificate".into()));
    }
    let cert = libp2p_tls::certificate::parse(end_entity)
        .map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))?;
    Ok(cert.peer_id())
}

/// Checks the TLS 1.3 CertificateVerify signature with the certificate's key.
fn verify_handshake_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let parsed = libp2p_tls::certificate::parse(cert)
        .map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))?;
    parsed
        .verify_signature(dss.scheme, message, dss.signature())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not accepted by the data plane".into())
}

/// Server side: requires a client certificate and accepts any valid identity (the allow list is applied once the
/// connection is up, so that refusals can be counted and explained).
#[derive(Debug)]
struct ClientIdentityVerifier;

impl ClientCertVerifier for ClientIdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        certificate_peer(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_handshake_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        VERIFY_SCHEMES.to_vec()
    }
}

/// What the server presented during a dial, kept so that a refused handshake can say who answered.
#[derive(Debug, Default)]
pub struct PresentedPeer(Mutex<Option<PeerId>>);

impl PresentedPeer {
    pub fn get(&self) -> Option<PeerId> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, peer: PeerId) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(peer);
    }
}

/// Client side: the server must prove it is the peer we meant to reach.
#[derive(Debug)]
struct ServerIdentityVerifier {
    expected: PeerId,
    presented: Arc<PresentedPeer>,
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let peer = certificate_peer(end_entity, intermediates)?;
        self.presented.set(peer);
        if peer != self.expected {
            return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_handshake_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        VERIFY_SCHEMES.to_vec()
    }
}

/// Transport settings of connections we accept: we send chunk bytes and receive only request frames, so our
/// receive windows are small and our send window is large. Congestion control is the sender's choice: BBR under a
/// ceiling that falls when a round trip loses too much ([`super::congestion`]).
pub fn server_transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.congestion_controller_factory(Arc::new(super::congestion::CappedBbrConfig::default()));
    transport
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(STREAMS_PER_CONNECTION_MAX))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .stream_receive_window(quinn::VarInt::from_u32(REQUEST_STREAM_WINDOW))
        .receive_window(quinn::VarInt::from_u32(REQUEST_CONNECTION_WINDOW))
        .send_window(SEND_WINDOW)
        .max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    transport
}

/// Transport settings of connections we dial: we receive chunk bytes (large receive windows) and the server may
/// open no streams towards us.
pub fn client_transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(0))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .stream_receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(quinn::VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    transport
}

/// The quinn server configuration: TLS 1.3, ALPN [`DATA_ALPN`], client certificates required, no resumption (every
/// connection proves both identities afresh), transport [`server_transport`].
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(identity.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("configuring TLS 1.3")?
        .with_client_cert_verifier(Arc::new(ClientIdentityVerifier))
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(identity.certified.clone())));
    tls.alpn_protocols = vec![DATA_ALPN.to_vec()];
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("building the QUIC TLS config")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(server_transport()));
    Ok(config)
}

/// A quinn client configuration that accepts only a server proving it is `expected`; the returned handle records
/// the identity the server actually presented.
pub fn client_config(identity: &Identity, expected: PeerId) -> Result<(quinn::ClientConfig, Arc<PresentedPeer>)> {
    let presented = Arc::new(PresentedPeer::default());
    let verifier = ServerIdentityVerifier { expected, presented: presented.clone() };
    let mut tls = rustls::ClientConfig::builder_with_provider(identity.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("configuring TLS 1.3")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(identity.certified.clone())));
    tls.alpn_protocols = vec![DATA_ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    tls.enable_sni = false;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("building the QUIC TLS config")?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(client_transport()));
    Ok((config, presented))
}

/// The peer id proven by the remote end of an established connection.
pub fn remote_peer(conn: &quinn::Connection) -> Result<PeerId> {
    let identity = conn.peer_identity().ok_or_else(|| anyhow!("the remote end presented no certificate"))?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| anyhow!("unexpected TLS session type (not rustls)"))?;
    let [cert] = certs.as_slice() else {
        return Err(anyhow!("the remote end presented {} certificates, expected one", certs.len()));
    };
    let parsed = libp2p_tls::certificate::parse(cert).map_err(|e| anyhow!("invalid identity certificate: {e}"))?;
    Ok(parsed.peer_id())
}
