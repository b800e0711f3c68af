//! The sending half of SRTP and SRTCP (RFC 3711, RFC 7714), keyed from DTLS-SRTP (RFC 5764).
//!
//! Sans-IO: [`SrtpSender::protect_rtp`] turns a plain RTP packet into an SRTP one in a caller's
//! buffer, [`SrtpSender::protect_rtcp`] does the same for a compound RTCP packet. AES-GCM is
//! the server's cipher (`rtc::crypto::Gcm`, ring); AES-CM, the SHA-1 HMAC and the key
//! derivation's AES rounds come from str0m's crypto provider (OpenSSL). The key derivation, the
//! packet layouts and the indexes are here.

use crate::rtc::crypto::{Gcm, TAG_LEN};
use ring::aead;
use str0m::config::CryptoProvider;
use str0m::crypto::dtls::SrtpProfile;
use str0m::crypto::{
    AeadAes128Gcm, AeadAes256Gcm, Aes128CmSha1_80, Aes128CmSha1_80Cipher, CryptoError,
    Sha1HmacProvider, SrtpProvider,
};

/// Key derivation labels (RFC 3711 §4.3.1).
const LABEL_RTP_KEY: u8 = 0;
const LABEL_RTP_AUTH: u8 = 1;
const LABEL_RTP_SALT: u8 = 2;
const LABEL_RTCP_KEY: u8 = 3;
const LABEL_RTCP_AUTH: u8 = 4;
const LABEL_RTCP_SALT: u8 = 5;

/// The E flag of the SRTCP index word: the packet is encrypted.
const SRTCP_ENCRYPTED: u32 = 0x8000_0000;
/// Bytes of the SRTCP index word.
const SRTCP_INDEX_LEN: usize = 4;
/// Room a counter-mode cipher may write past the input (one AES block).
const CTR_SCRATCH: usize = 16;

/// Bytes SRTP adds to an RTP packet at most (tag; index and tag for SRTCP).
pub(super) const MAX_OVERHEAD: usize = SRTCP_INDEX_LEN + TAG_LEN + CTR_SCRATCH;

/// Why keys could not be made.
#[derive(Debug, thiserror::Error)]
pub(super) enum SrtpError {
    #[error("DTLS-SRTP keying material of {got} bytes, {profile:?} needs {want}")]
    MaterialLength {
        profile: SrtpProfile,
        got: usize,
        want: usize,
    },
    #[error("SRTP profile {0:?} is not supported")]
    Profile(SrtpProfile),
    #[error("SRTP encryption failed: {0}")]
    Cipher(#[from] CryptoError),
    #[error("packet of {0} bytes does not fit the output buffer")]
    TooLarge(usize),
}

/// One direction's master key and salt (RFC 3711 §4.3), with the AES-CM PRF of §4.3.3.
struct Master<'a> {
    key: &'a [u8],
    salt: &'a [u8],
}

impl Master<'_> {
    /// Fills `out` with the key derived for `label` (key derivation rate 0).
    fn derive(&self, srtp: &dyn SrtpProvider, label: u8, out: &mut [u8]) {
        // x = (label << 48) XOR master_salt, salt left aligned in 112 bits;
        // the PRF is AES in counter mode over x * 2^16.
        let mut input = [0u8; 16];
        input[..self.salt.len()].copy_from_slice(self.salt);
        input[7] ^= label;
        let mut block = [0u8; 32];
        for (counter, chunk) in out.chunks_mut(16).enumerate() {
            input[14..].copy_from_slice(&(counter as u16).to_be_bytes());
            match self.key.len() {
                32 => srtp.srtp_aes_256_ecb_round(self.key, &input, &mut block),
                _ => srtp.srtp_aes_128_ecb_round(self.key, &input, &mut block),
            }
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }
}

/// A session key set for RTP or for RTCP.
enum Keys {
    CmSha1 {
        cipher: Box<dyn Aes128CmSha1_80Cipher>,
        auth: [u8; Aes128CmSha1_80::HMAC_KEY_LEN],
        salt: [u8; Aes128CmSha1_80::SALT_LEN],
    },
    /// AEAD_AES_128_GCM or AEAD_AES_256_GCM (RFC 7714).
    Gcm {
        key: Box<Gcm>,
        salt: [u8; AeadAes128Gcm::SALT_LEN],
    },
}

impl Keys {
    fn derive(
        srtp: &dyn SrtpProvider,
        profile: SrtpProfile,
        master: &Master<'_>,
        [key_label, auth_label, salt_label]: [u8; 3],
    ) -> Result<Self, SrtpError> {
        Ok(match profile {
            SrtpProfile::AES128_CM_SHA1_80 => {
                let mut key = [0; 16];
                let mut auth = [0; Aes128CmSha1_80::HMAC_KEY_LEN];
                let mut salt = [0; Aes128CmSha1_80::SALT_LEN];
                master.derive(srtp, key_label, &mut key);
                master.derive(srtp, auth_label, &mut auth);
                master.derive(srtp, salt_label, &mut salt);
                let cipher = srtp.aes_128_cm_sha1_80().create_cipher(key, true);
                Self::CmSha1 { cipher, auth, salt }
            }
            SrtpProfile::AEAD_AES_128_GCM => {
                Self::gcm(srtp, master, &aead::AES_128_GCM, key_label, salt_label)
            }
            SrtpProfile::AEAD_AES_256_GCM => {
                Self::gcm(srtp, master, &aead::AES_256_GCM, key_label, salt_label)
            }
            other => return Err(SrtpError::Profile(other)),
        })
    }
}

impl Keys {
    fn gcm(
        srtp: &dyn SrtpProvider,
        master: &Master<'_>,
        algorithm: &'static aead::Algorithm,
        key_label: u8,
        salt_label: u8,
    ) -> Self {
        let mut key = [0; 32];
        let key = &mut key[..algorithm.key_len()];
        let mut salt = [0; AeadAes128Gcm::SALT_LEN];
        master.derive(srtp, key_label, key);
        master.derive(srtp, salt_label, &mut salt);
        Self::Gcm {
            key: Box::new(Gcm::new(algorithm, key)),
            salt,
        }
    }
}

/// Key and salt lengths of a profile's master key.
fn master_lengths(profile: SrtpProfile) -> Result<(usize, usize), SrtpError> {
    match profile {
        SrtpProfile::AES128_CM_SHA1_80 => Ok((16, Aes128CmSha1_80::SALT_LEN)),
        SrtpProfile::AEAD_AES_128_GCM => Ok((16, AeadAes128Gcm::SALT_LEN)),
        SrtpProfile::AEAD_AES_256_GCM => Ok((32, AeadAes256Gcm::SALT_LEN)),
        other => Err(SrtpError::Profile(other)),
    }
}

/// Encrypts what one endpoint sends: RTP for every SSRC of the session, and its RTCP.
pub(super) struct SrtpSender {
    rtp: Keys,
    rtcp: Keys,
    hmac: &'static dyn Sha1HmacProvider,
    /// The next SRTCP index (31 bits).
    rtcp_index: u32,
}

impl SrtpSender {
    /// Keys for the DTLS client's direction (`client` true) or the server's, from the exported
    /// material: client key, server key, client salt, server salt (RFC 5764 §4.2).
    pub(super) fn new(
        crypto: &CryptoProvider,
        profile: SrtpProfile,
        material: &[u8],
        client: bool,
    ) -> Result<Self, SrtpError> {
        let (key_len, salt_len) = master_lengths(profile)?;
        let want = 2 * (key_len + salt_len);
        if material.len() != want {
            return Err(SrtpError::MaterialLength {
                profile,
                got: material.len(),
                want,
            });
        }
        let (key_at, salt_at) = if client {
            (0, 2 * key_len)
        } else {
            (key_len, 2 * key_len + salt_len)
        };
        let master = Master {
            key: &material[key_at..key_at + key_len],
            salt: &material[salt_at..salt_at + salt_len],
        };
        let srtp = crypto.srtp_provider;
        Ok(Self {
            rtp: Keys::derive(
                srtp,
                profile,
                &master,
                [LABEL_RTP_KEY, LABEL_RTP_AUTH, LABEL_RTP_SALT],
            )?,
            rtcp: Keys::derive(
                srtp,
                profile,
                &master,
                [LABEL_RTCP_KEY, LABEL_RTCP_AUTH, LABEL_RTCP_SALT],
            )?,
            hmac: crypto.sha1_hmac_provider,
            rtcp_index: 0,
        })
    }

    /// Writes the SRTP form of the RTP packet `plain` (its header is `header_len` bytes) into
    /// `out` and returns its length. `roc` is the SSRC's rollover counter: its sequence number
    /// has wrapped that many times.
    pub(super) fn protect_rtp(
        &mut self,
        plain: &[u8],
        header_len: usize,
        roc: u32,
        out: &mut [u8],
    ) -> Result<usize, SrtpError> {
        let ssrc = u32::from_be_bytes([plain[8], plain[9], plain[10], plain[11]]);
        let seq = u16::from_be_bytes([plain[2], plain[3]]);
        let (header, payload) = plain.split_at(header_len);
        let end = plain.len();
        if out.len() < end + MAX_OVERHEAD {
            return Err(SrtpError::TooLarge(end));
        }
        out[..header_len].copy_from_slice(header);
        match &mut self.rtp {
            Keys::CmSha1 { cipher, auth, salt } => {
                let index = (u64::from(roc) << 16) | u64::from(seq);
                let iv = Aes128CmSha1_80::rtp_iv(*salt, ssrc, index);
                cipher.encrypt(&iv, payload, &mut out[header_len..end + CTR_SCRATCH])?;
                let hmac = self.hmac;
                Aes128CmSha1_80::rtp_hmac(|k, d| hmac.sha1_hmac(k, d), auth, out, index, end);
                Ok(end + Aes128CmSha1_80::HMAC_TAG_LEN)
            }
            Keys::Gcm { key, salt } => {
                let iv = AeadAes128Gcm::rtp_iv(*salt, ssrc, roc, seq);
                out[header_len..end].copy_from_slice(payload);
                Ok(header_len
                    + key.seal_in_place(iv, header, &mut out[header_len..], end - header_len)?)
            }
        }
    }

    /// Writes the SRTCP form of the compound RTCP packet `plain` into `out` and returns its
    /// length. The first 8 bytes (header and sender SSRC) stay in the clear.
    pub(super) fn protect_rtcp(
        &mut self,
        plain: &[u8],
        out: &mut [u8],
    ) -> Result<usize, SrtpError> {
        let end = plain.len();
        if end < 8 || out.len() < end + MAX_OVERHEAD {
            return Err(SrtpError::TooLarge(end));
        }
        let ssrc = u32::from_be_bytes([plain[4], plain[5], plain[6], plain[7]]);
        let index = self.rtcp_index;
        self.rtcp_index = (index + 1) & !SRTCP_ENCRYPTED;
        let e_index = (SRTCP_ENCRYPTED | index).to_be_bytes();
        let (header, body) = plain.split_at(8);
        out[..8].copy_from_slice(header);
        match &mut self.rtcp {
            Keys::CmSha1 { cipher, auth, salt } => {
                let iv = Aes128CmSha1_80::rtp_iv(*salt, ssrc, u64::from(index));
                cipher.encrypt(&iv, body, &mut out[8..end + CTR_SCRATCH])?;
                out[end..end + SRTCP_INDEX_LEN].copy_from_slice(&e_index);
                let signed = end + SRTCP_INDEX_LEN;
                let hmac = self.hmac;
                Aes128CmSha1_80::rtcp_hmac(|k, d| hmac.sha1_hmac(k, d), auth, out, signed);
                Ok(signed + Aes128CmSha1_80::HMAC_TAG_LEN)
            }
            Keys::Gcm { key, salt } => {
                let iv = AeadAes128Gcm::rtcp_iv(*salt, ssrc, index);
                let mut aad = [0u8; AeadAes128Gcm::RTCP_AAD_LEN];
                aad[..8].copy_from_slice(header);
                aad[8..].copy_from_slice(&e_index);
                out[8..end].copy_from_slice(body);
                let to = 8 + key.seal_in_place(iv, &aad, &mut out[8..], end - 8)?;
                out[to..to + SRTCP_INDEX_LEN].copy_from_slice(&e_index);
                Ok(to + SRTCP_INDEX_LEN)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 3711, appendix B.3: the AES-CM key derivation test vectors.
    #[test]
    fn key_derivation_matches_rfc3711() {
        let crypto = str0m::crypto::from_feature_flags();
        let key = hex("E1F97A0D3E018BE0D64FA32C06DE4139");
        let salt = hex("0EC675AD498AFEEBB6960B3AABE6");
        let master = Master {
            key: &key,
            salt: &salt,
        };
        let mut out = [0u8; 16];
        master.derive(crypto.srtp_provider, LABEL_RTP_KEY, &mut out);
        assert_eq!(out.to_vec(), hex("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut out = [0u8; 14];
        master.derive(crypto.srtp_provider, LABEL_RTP_SALT, &mut out);
        assert_eq!(out.to_vec(), hex("30CBBC08863D8C85D49DB34A9AE1"));
        let mut out = [0u8; 20];
        master.derive(crypto.srtp_provider, LABEL_RTP_AUTH, &mut out);
        assert_eq!(
            out.to_vec(),
            hex("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4")
        );
    }

    /// What we protect, webrtc-rs's SRTP (an independent implementation) decrypts, in all
    /// three profiles, for RTP across a rollover and for RTCP.
    #[test]
    fn webrtc_rs_decrypts_what_we_protect() {
        use rtc::srtp::context::Context;
        use rtc::srtp::protection_profile::ProtectionProfile;
        let crypto = str0m::crypto::from_feature_flags();
        for (profile, theirs) in [
            (
                SrtpProfile::AES128_CM_SHA1_80,
                ProtectionProfile::Aes128CmHmacSha1_80,
            ),
            (
                SrtpProfile::AEAD_AES_128_GCM,
                ProtectionProfile::AeadAes128Gcm,
            ),
            (
                SrtpProfile::AEAD_AES_256_GCM,
                ProtectionProfile::AeadAes256Gcm,
            ),
        ] {
            let (key_len, salt_len) = master_lengths(profile).unwrap();
            let material: Vec<u8> = (0..2 * (key_len + salt_len))
                .map(|i| (i * 7) as u8)
                .collect();
            // We are the DTLS server: the second key and the second salt.
            let key = &material[key_len..2 * key_len];
            let salt = &material[2 * key_len + salt_len..];
            let mut ours = SrtpSender::new(&crypto, profile, &material, false).unwrap();
            let mut them = Context::new(
                key,
                salt,
                theirs,
                None,
                None,
                &rtc::crypto::providers::RingCrypto,
            )
            .unwrap();
            let mut out = [0u8; 1600];
            for (seq, roc) in [(65534u16, 0u32), (65535, 0), (0, 1), (1, 1)] {
                let mut rtp = vec![0x80, 96, 0, 0, 0, 0, 0x10, 0, 0xCA, 0xFE, 0xBA, 0xBE];
                rtp[2..4].copy_from_slice(&seq.to_be_bytes());
                rtp.extend((0..1000).map(|i| (i % 256) as u8));
                let n = ours.protect_rtp(&rtp, 12, roc, &mut out).unwrap();
                assert_ne!(&out[12..rtp.len()], &rtp[12..], "{profile:?}: encrypted");
                let plain = them.decrypt_rtp(&out[..n]).unwrap();
                assert_eq!(&plain[..], &rtp[..], "{profile:?} seq {seq}");
            }
            for _ in 0..2 {
                let mut rtcp = vec![0x80, 200, 0, 6, 0xCA, 0xFE, 0xBA, 0xBE];
                rtcp.extend((0..20).map(|i| i as u8));
                let n = ours.protect_rtcp(&rtcp, &mut out).unwrap();
                let plain = them.decrypt_rtcp(&out[..n]).unwrap();
                assert_eq!(&plain[..], &rtcp[..], "{profile:?} RTCP");
            }
        }
    }

    #[test]
    fn keying_material_is_checked() {
        let crypto = str0m::crypto::from_feature_flags();
        let short = [0u8; 10];
        let err = SrtpSender::new(&crypto, SrtpProfile::AEAD_AES_128_GCM, &short, true)
            .err()
            .unwrap();
        assert!(err.to_string().contains("needs 56"), "{err}");
    }
}
