//! Node keys. One ed25519 key per node, stored as a PKCS#8 PEM file (readable with `openssl pkey`). The same key is
//! the node's libp2p identity (its `PeerId`), its data-plane TLS identity and, on the origin, the publisher key
//! that signs roots. Operators name nodes and publishers by the `PeerId` that `mirrormesh keygen` prints.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use libp2p_identity::{Keypair, PeerId, PublicKey};
use mirrormesh_proto::PublisherKey;

/// An ed25519 key pair: its 32-byte secret seed and the same key as a libp2p identity.
#[derive(Clone)]
pub struct NodeKey {
    secret: [u8; 32],
    keypair: Keypair,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", self.peer_id())
    }
}

impl NodeKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<Self> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| anyhow!("no randomness from the operating system: {e}"))?;
        Self::from_seed(secret)
    }

    /// A key from a fixed seed (tests and the demo, where reproducible identities help).
    pub fn from_seed(secret: [u8; 32]) -> Result<Self> {
        let mut seed = secret;
        let keypair = Keypair::ed25519_from_bytes(&mut seed).map_err(|e| anyhow!("invalid ed25519 seed: {e}"))?;
        Ok(Self { secret, keypair })
    }

    /// Loads a node key; warns if the file is readable by group or others.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_checked(path, false)
    }

    /// Loads a publisher's key (the origin's node key signs every root): refuses a file readable by group or others,
    /// since whoever reads it can sign snapshots every mirror accepts.
    pub fn load_publisher(path: &Path) -> Result<Self> {
        Self::load_checked(path, true)
    }

    fn load_checked(path: &Path, publisher: bool) -> Result<Self> {
        let pem = std::fs::read_to_string(path).with_context(|| format!("reading key file {}", path.display()))?;
        let key = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| anyhow!("key file {} is not an ed25519 PKCS#8 PEM key: {e}", path.display()))?;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            let mode = meta.permissions().mode() & 0o777;
            if publisher {
                bail!(
                    "key file {} (mode {mode:o}) is readable by group or others and is the publisher key: whoever \
                     reads it can sign snapshots every mirror accepts; chmod 600 it",
                    path.display()
                );
            }
            tracing::warn!(path = %path.display(), "key file is readable by group or others; chmod 600 it");
        }
        Self::from_seed(key.to_bytes())
    }

    /// Writes the key to a new file readable only by its owner; refuses to overwrite an existing file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let pem = SigningKey::from_bytes(&self.secret)
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| anyhow!("encoding key as PKCS#8: {e}"))?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating key file {} (it must not exist yet)", path.display()))?;
        file.write_all(pem.as_bytes())?;
        file.sync_all()?;
        Ok(())
    }

    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    pub fn publisher_key(&self) -> PublisherKey {
        mirrormesh_proto::root::publisher_key(&self.secret)
    }

    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair().public().to_peer_id()
    }
}

/// The ed25519 public key inside an ed25519 `PeerId` (which embeds its key).
pub fn peer_public_key(peer: &PeerId) -> Result<PublisherKey> {
    // An ed25519 PeerId is an "identity" multihash: code 0x00, a one-byte length, the protobuf-encoded public key.
    let bytes = peer.to_bytes();
    let embedded = match bytes.as_slice() {
        [0x00, len, key @ ..] if usize::from(*len) == key.len() => key,
        _ => bail!("peer id {peer} does not embed its public key (not an ed25519 identity)"),
    };
    let key = PublicKey::try_decode_protobuf(embedded)
        .map_err(|e| anyhow!("peer id {peer}: bad embedded key: {e}"))?
        .try_into_ed25519()
        .map_err(|_| anyhow!("peer id {peer} is not an ed25519 identity"))?;
    Ok(PublisherKey(key.to_bytes()))
}

/// Parses a publisher given as a `PeerId` (`12D3Koo...`, what `keygen` prints) or as 64 hex digits of public key.
pub fn parse_publisher(text: &str) -> Result<PublisherKey> {
    if let Some(hash) = mirrormesh_proto::NodeHash::from_hex(text) {
        return Ok(PublisherKey(hash.0));
    }
    let peer: PeerId = text.parse().map_err(|e| anyhow!("{text:?} is neither a peer id nor a hex public key: {e}"))?;
    peer_public_key(&peer)
}

/// The `PeerId` of a publisher key.
pub fn peer_id_of(key: &PublisherKey) -> Result<PeerId> {
    let public = libp2p_identity::ed25519::PublicKey::try_from_bytes(&key.0)
        .map_err(|e| anyhow!("invalid ed25519 public key: {e}"))?;
    Ok(PublicKey::from(public).to_peer_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publisher_key_readable_by_others_is_refused_a_node_key_only_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        NodeKey::generate().unwrap().save(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", NodeKey::load_publisher(&path).unwrap_err());
        assert!(e.contains("publisher key") && e.contains("chmod 600"), "{e}");
        assert!(NodeKey::load(&path).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(NodeKey::load_publisher(&path).is_ok());
    }

    #[test]
    fn save_load_and_identities_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let key = NodeKey::generate().unwrap();
        key.save(&path).unwrap();
        assert!(key.save(&path).is_err(), "must not overwrite");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let loaded = NodeKey::load(&path).unwrap();
        assert_eq!(loaded.secret(), key.secret());
        let peer = key.peer_id();
        assert_eq!(peer_public_key(&peer).unwrap(), key.publisher_key());
        assert_eq!(parse_publisher(&peer.to_string()).unwrap(), key.publisher_key());
        assert_eq!(peer_id_of(&key.publisher_key()).unwrap(), peer);
        let hex: String = key.publisher_key().0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_publisher(&hex).unwrap(), key.publisher_key());
        assert!(parse_publisher("not-a-key").is_err());
        std::fs::write(dir.path().join("bad.key"), "garbage").unwrap();
        assert!(NodeKey::load(&dir.path().join("bad.key")).is_err());
    }
}
