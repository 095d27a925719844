//! Secrets at rest (server credentials, secret variables): XChaCha20-Poly1305 with a key
//! derived from `BATON_MASTER_KEY`. Each value gets a random 192-bit nonce, stored before the
//! ciphertext; the row's id is bound as associated data so a ciphertext cannot be moved to
//! another row.

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// Secrets cannot be stored or read without a master key.
    #[error(
        "BATON_MASTER_KEY is not set: the api cannot store or read secrets (set it on every api replica)"
    )]
    NoMasterKey,
    #[error("BATON_MASTER_KEY must be at least 32 characters (e.g. `openssl rand -base64 32`)")]
    WeakMasterKey,
    /// Wrong master key, or the stored value was altered.
    #[error(
        "a stored secret could not be decrypted: wrong BATON_MASTER_KEY, or the value was altered"
    )]
    Decrypt,
}

/// The cipher for secrets; cheap to clone.
#[derive(Clone)]
pub struct Vault {
    cipher: Option<XChaCha20Poly1305>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("configured", &self.cipher.is_some())
            .finish()
    }
}

const NONCE_LEN: usize = 24;

impl Vault {
    /// A vault from the configured master key (none: secrets are refused with a clear error).
    pub fn new(master_key: Option<&str>) -> Result<Self, CryptoError> {
        let cipher = match master_key {
            None => None,
            Some(k) if k.len() < 32 => return Err(CryptoError::WeakMasterKey),
            Some(k) => {
                // The key string may be any high-entropy text; hash it to the 256-bit key.
                let key = Sha256::digest(k.as_bytes());
                Some(XChaCha20Poly1305::new(&key))
            }
        };
        Ok(Self { cipher })
    }

    pub fn is_configured(&self) -> bool {
        self.cipher.is_some()
    }

    /// Encrypts `plaintext` for the row `aad` (its id); returns nonce ‖ ciphertext.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = self.cipher.as_ref().ok_or(CryptoError::NoMasterKey)?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Decrypt)?;
        let mut out = nonce.to_vec();
        out.extend(sealed);
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = self.cipher.as_ref().ok_or(CryptoError::NoMasterKey)?;
        if sealed.len() < NONCE_LEN {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Decrypt)?;
        cipher
            .decrypt(&XNonce::from(nonce), Payload { msg: body, aad })
            .map_err(|_| CryptoError::Decrypt)
    }
}

/// A fresh master key for `baton dev` (base64 of 32 random bytes).
pub fn generate_master_key() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    base64::engine::general_purpose::STANDARD.encode(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper_detection() {
        let vault = Vault::new(Some(&generate_master_key())).expect("vault");
        let sealed = vault.seal(b"secret", b"row-1").expect("seal");
        assert_eq!(vault.open(&sealed, b"row-1").expect("open"), b"secret");
        assert!(
            matches!(vault.open(&sealed, b"row-2"), Err(CryptoError::Decrypt)),
            "bound to its row"
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            vault.open(&tampered, b"row-1"),
            Err(CryptoError::Decrypt)
        ));
        let other = Vault::new(Some(&generate_master_key())).expect("vault");
        assert!(matches!(
            other.open(&sealed, b"row-1"),
            Err(CryptoError::Decrypt)
        ));
        assert!(matches!(
            Vault::new(None).expect("vault").seal(b"x", b"y"),
            Err(CryptoError::NoMasterKey)
        ));
        assert!(matches!(
            Vault::new(Some("short")),
            Err(CryptoError::WeakMasterKey)
        ));
    }
}
