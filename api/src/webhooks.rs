//! Webhook keys and delivery signatures.
//!
//! A key is `bhk_` and 40 alphanumerics (~238 bits), stored as its SHA-256 like API tokens.
//! A signed delivery carries `X-Baton-Signature: sha256=<hex HMAC-SHA256 of the raw body>`,
//! compared in constant time.

use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2_hmac::Sha256;
use uuid::Uuid;

/// Prefix of every webhook key.
pub const KEY_PREFIX: &str = "bhk_";

/// The header carrying a delivery's signature.
pub const SIGNATURE_HEADER: &str = "x-baton-signature";

/// A new random webhook key.
pub fn generate_key() -> String {
    let body: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    format!("{KEY_PREFIX}{body}")
}

/// What the signing secret of webhook `id` is sealed to (stable for the row's life).
pub fn secret_identity(id: Uuid) -> String {
    format!("baton.webhook/{id}")
}

/// Why a delivery's signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error(
        "this webhook requires a signature: send X-Baton-Signature: sha256=<hex HMAC-SHA256 of the body>"
    )]
    Missing,
    #[error("X-Baton-Signature must be sha256=<64 hex digits>")]
    Malformed,
    #[error("X-Baton-Signature does not match the body")]
    Mismatch,
}

/// Checks `header` (the `X-Baton-Signature` value, if any) against the body.
pub fn verify(secret: &[u8], body: &[u8], header: Option<&[u8]>) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex_digits = header
        .strip_prefix(b"sha256=")
        .ok_or(SignatureError::Malformed)?;
    let tag = hex::decode(hex_digits).map_err(|_| SignatureError::Malformed)?;
    if tag.len() != 32 {
        return Err(SignatureError::Malformed);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| SignatureError::Mismatch)?;
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&tag).map_err(|_| SignatureError::Mismatch)
}

/// The `X-Baton-Signature` value for `body` (for senders and tests).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_refuse() {
        let body = br#"{"a":1}"#;
        let good = sign(b"secret-key", body);
        assert!(verify(b"secret-key", body, Some(good.as_bytes())).is_ok());
        assert_eq!(
            verify(b"other-key", body, Some(good.as_bytes())),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"secret-key", b"{}", Some(good.as_bytes())),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify(b"k", body, None), Err(SignatureError::Missing));
        assert_eq!(
            verify(b"k", body, Some(b"sha1=00")),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(b"k", body, Some(b"sha256=zz")),
            Err(SignatureError::Malformed)
        );
        // A known vector (RFC 4231 test case 2).
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(generate_key().starts_with(KEY_PREFIX));
    }
}
