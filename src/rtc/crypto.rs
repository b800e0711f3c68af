//! The crypto provider of every str0m session, server and publisher: str0m's OpenSSL provider
//! (DTLS, the STUN HMAC, SHA-256, AES-CM SRTP and the key derivation's AES rounds), with the
//! AES-GCM SRTP profiles (RFC 7714) from ring.
//!
//! OpenSSL's EVP interface sets its cipher context up again for every packet (`decrypt_init`,
//! cipher lookups by name); ring keeps an expanded key and does one AES-GCM pass. SRTP is a
//! large part of what a copying server spends per packet, and the answer prefers AES-GCM.

use std::sync::{Arc, LazyLock};

use ring::aead::{self, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use str0m::config::CryptoProvider;
use str0m::crypto::{
    AeadAes128GcmCipher, AeadAes256GcmCipher, CryptoError, SrtpProvider, SupportedAeadAes128Gcm,
    SupportedAeadAes256Gcm, SupportedAes128CmSha1_80,
};

/// str0m's provider as its feature flags build it (OpenSSL).
static OPENSSL: LazyLock<CryptoProvider> = LazyLock::new(str0m::crypto::from_feature_flags);

/// The provider: [`OPENSSL`]'s, with [`RingSrtp`] for SRTP.
static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
    Arc::new(CryptoProvider {
        srtp_provider: &RingSrtp,
        ..OPENSSL.clone()
    })
});

/// The crypto provider for str0m (`RtcConfig::set_crypto_provider`, the process default).
pub fn provider() -> &'static Arc<CryptoProvider> {
    &PROVIDER
}

/// AES-GCM from ring; AES-CM with HMAC-SHA1 and the ECB rounds from OpenSSL.
#[derive(Debug)]
struct RingSrtp;

impl SrtpProvider for RingSrtp {
    fn aes_128_cm_sha1_80(&self) -> &'static dyn SupportedAes128CmSha1_80 {
        OPENSSL.srtp_provider.aes_128_cm_sha1_80()
    }

    fn aead_aes_128_gcm(&self) -> &'static dyn SupportedAeadAes128Gcm {
        &RingGcm
    }

    fn aead_aes_256_gcm(&self) -> &'static dyn SupportedAeadAes256Gcm {
        &RingGcm
    }

    fn srtp_aes_128_ecb_round(&self, key: &[u8], input: &[u8], output: &mut [u8]) {
        OPENSSL
            .srtp_provider
            .srtp_aes_128_ecb_round(key, input, output);
    }

    fn srtp_aes_256_ecb_round(&self, key: &[u8], input: &[u8], output: &mut [u8]) {
        OPENSSL
            .srtp_provider
            .srtp_aes_256_ecb_round(key, input, output);
    }
}

/// Makes [`Gcm`] ciphers of either key size.
#[derive(Debug)]
struct RingGcm;

impl SupportedAeadAes128Gcm for RingGcm {
    fn create_cipher(&self, key: [u8; 16], _encrypt: bool) -> Box<dyn AeadAes128GcmCipher> {
        Box::new(Gcm::new(&aead::AES_128_GCM, &key))
    }
}

impl SupportedAeadAes256Gcm for RingGcm {
    fn create_cipher(&self, key: [u8; 32], _encrypt: bool) -> Box<dyn AeadAes256GcmCipher> {
        Box::new(Gcm::new(&aead::AES_256_GCM, &key))
    }
}

/// Bytes of an AES-GCM tag.
pub const TAG_LEN: usize = 16;

/// One AES-GCM key, for sealing or opening SRTP and SRTCP.
pub struct Gcm {
    key: LessSafeKey,
}

impl std::fmt::Debug for Gcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gcm").finish_non_exhaustive()
    }
}

impl Gcm {
    /// A key for `algorithm` (AES-128-GCM or AES-256-GCM); `key` has its length.
    pub fn new(algorithm: &'static aead::Algorithm, key: &[u8]) -> Self {
        let key = UnboundKey::new(algorithm, key).expect("the key has the algorithm's length");
        Self {
            key: LessSafeKey::new(key),
        }
    }

    /// Seals `buf[..end]` in place and writes the tag after it; returns where the tag ends.
    /// `buf` holds at least `end + TAG_LEN` bytes.
    pub fn seal_in_place(
        &self,
        iv: [u8; 12],
        aad: &[u8],
        buf: &mut [u8],
        end: usize,
    ) -> Result<usize, CryptoError> {
        if buf.len() < end + TAG_LEN {
            return Err(CryptoError::Other("AES-GCM output buffer too small".into()));
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(aad),
                &mut buf[..end],
            )
            .map_err(|_| CryptoError::Other("AES-GCM sealing failed".into()))?;
        buf[end..end + TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(end + TAG_LEN)
    }

    fn encrypt(
        &self,
        iv: &[u8; 12],
        aad: &[u8],
        input: &[u8],
        output: &mut [u8],
    ) -> Result<(), CryptoError> {
        let end = input.len();
        output
            .get_mut(..end)
            .ok_or_else(|| CryptoError::Other("AES-GCM output buffer too small".into()))?
            .copy_from_slice(input);
        self.seal_in_place(*iv, aad, output, end).map(drop)
    }

    /// Opens `input` (ciphertext and tag) into `output`, authenticating the concatenated
    /// `aads`; returns the plaintext's length.
    fn decrypt(
        &self,
        iv: &[u8; 12],
        aads: &[&[u8]],
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, CryptoError> {
        let Some(len) = input.len().checked_sub(TAG_LEN) else {
            return Err(CryptoError::Other(
                "SRTP packet shorter than its tag".into(),
            ));
        };
        let (ciphertext, tag) = input.split_at(len);
        let tag = Tag::try_from(tag).map_err(|_| CryptoError::Other("bad tag length".into()))?;
        let out = output
            .get_mut(..len)
            .ok_or_else(|| CryptoError::Other("AES-GCM output buffer too small".into()))?;
        out.copy_from_slice(ciphertext);
        let nonce = Nonce::assume_unique_for_key(*iv);
        let opened = match aads {
            // str0m passes an encrypted SRTCP packet's AAD with an empty second part.
            [aad] | [aad, []] => {
                self.key
                    .open_in_place_separate_tag(nonce, Aad::from(aad), tag, out, 0..)
            }
            _ => {
                self.key
                    .open_in_place_separate_tag(nonce, Aad::from(aads.concat()), tag, out, 0..)
            }
        };
        opened.map_err(|_| CryptoError::Other("SRTP authentication failed".into()))?;
        Ok(len)
    }
}

impl AeadAes128GcmCipher for Gcm {
    fn encrypt(
        &mut self,
        iv: &[u8; 12],
        aad: &[u8],
        input: &[u8],
        output: &mut [u8],
    ) -> Result<(), CryptoError> {
        Gcm::encrypt(self, iv, aad, input, output)
    }

    fn decrypt(
        &mut self,
        iv: &[u8; 12],
        aads: &[&[u8]],
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, CryptoError> {
        Gcm::decrypt(self, iv, aads, input, output)
    }
}

impl AeadAes256GcmCipher for Gcm {
    fn encrypt(
        &mut self,
        iv: &[u8; 12],
        aad: &[u8],
        input: &[u8],
        output: &mut [u8],
    ) -> Result<(), CryptoError> {
        Gcm::encrypt(self, iv, aad, input, output)
    }

    fn decrypt(
        &mut self,
        iv: &[u8; 12],
        aads: &[&[u8]],
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, CryptoError> {
        Gcm::decrypt(self, iv, aads, input, output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IV: [u8; 12] = [7; 12];

    fn payload() -> Vec<u8> {
        (0..1100u32).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Seals with one provider, opens with the other; both ways, both key sizes.
    #[test]
    fn ring_and_openssl_gcm_open_what_the_other_sealed() {
        let ours = provider().srtp_provider;
        let theirs = OPENSSL.srtp_provider;
        let plain = payload();
        let aad = [0x80u8, 0x60, 0, 1, 0, 0, 0, 2, 0xde, 0xad, 0xbe, 0xef];
        for (sealer, opener) in [(ours, theirs), (theirs, ours)] {
            let mut sealed = vec![0u8; plain.len() + TAG_LEN];
            let mut opened = vec![0u8; plain.len()];
            let mut enc = sealer.aead_aes_128_gcm().create_cipher([3; 16], true);
            let mut dec = opener.aead_aes_128_gcm().create_cipher([3; 16], false);
            enc.encrypt(&IV, &aad, &plain, &mut sealed).unwrap();
            assert_eq!(
                dec.decrypt(&IV, &[&aad], &sealed, &mut opened).unwrap(),
                plain.len()
            );
            assert_eq!(opened, plain);
            // An encrypted SRTCP packet's AAD comes with an empty second part.
            opened.fill(0);
            let aads: [&[u8]; 2] = [&aad, &[]];
            assert_eq!(
                dec.decrypt(&IV, &aads, &sealed, &mut opened).unwrap(),
                plain.len()
            );
            assert_eq!(opened, plain);

            let mut enc = sealer.aead_aes_256_gcm().create_cipher([5; 32], true);
            let mut dec = opener.aead_aes_256_gcm().create_cipher([5; 32], false);
            enc.encrypt(&IV, &aad, &plain, &mut sealed).unwrap();
            // The AAD in two pieces, as str0m passes an unencrypted SRTCP packet's.
            let (a, b) = aad.split_at(8);
            assert_eq!(
                dec.decrypt(&IV, &[a, b], &sealed, &mut opened).unwrap(),
                plain.len()
            );
            assert_eq!(opened, plain);
        }
    }

    #[test]
    fn a_changed_byte_or_short_input_is_an_error_not_a_panic() {
        let srtp = provider().srtp_provider;
        let plain = payload();
        let mut sealed = vec![0u8; plain.len() + TAG_LEN];
        let mut opened = vec![0u8; plain.len()];
        let mut enc = srtp.aead_aes_128_gcm().create_cipher([3; 16], true);
        let mut dec = srtp.aead_aes_128_gcm().create_cipher([3; 16], false);
        enc.encrypt(&IV, b"header......", &plain, &mut sealed)
            .unwrap();
        assert!(
            dec.decrypt(&IV, &[b"header!....."], &sealed, &mut opened)
                .is_err()
        );
        sealed[40] ^= 1;
        assert!(
            dec.decrypt(&IV, &[b"header......"], &sealed, &mut opened)
                .is_err()
        );
        assert!(
            dec.decrypt(&IV, &[b"header......"], &sealed[..10], &mut opened)
                .is_err()
        );
        assert!(
            enc.encrypt(&IV, b"header......", &plain, &mut opened)
                .is_err()
        );
    }
}
