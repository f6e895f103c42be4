//! The key ceremony: how keys enter the gateway from the key owner.
//!
//! Two ways in, both ending in a key sealed under the master key:
//! - **Components.** 2 or 3 clear components, each with its own KCV, entered by separate
//!   custodians; [`combine_components`] checks each against its KCV and XORs them. A BDK or a
//!   key-encryption key (KEK, the ZMK of the key owner's HSM) is entered this way.
//! - **TR-31 under a KEK.** Once a KEK is in, the key owner sends BDKs as TR-31 key blocks under
//!   it; [`check_bdk_block`] says which blocks are accepted ([`ImportPolicy`]).
//!
//! Everything clear lives in zeroizing types: a component's hex text in a `Zeroizing<String>`,
//! the combined key in a [`SymmetricKey`]. No error carries key material.

use std::fmt;

use rki_protocol::secret::ct_eq;
use rki_protocol::tr31::{self, Header, Version};
use rki_protocol::{Kcv, KcvLen, KeyAlgorithm, SecretBytes, SymmetricKey};
use zeroize::Zeroizing;

use super::KeyServiceError;

/// Components of one key: at least two custodians, at most three.
pub const COMPONENTS_MIN: usize = 2;
pub const COMPONENTS_MAX: usize = 3;

/// The family a key owner declares for a key: TDES (two- or three-key) or AES (128/192/256).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFamily {
    Tdes,
    Aes,
}

impl KeyFamily {
    /// `tdes` or `aes`, as the API and `rkictl` spell them.
    pub fn parse(text: &str) -> Option<KeyFamily> {
        match text {
            "tdes" => Some(KeyFamily::Tdes),
            "aes" => Some(KeyFamily::Aes),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyFamily::Tdes => "tdes",
            KeyFamily::Aes => "aes",
        }
    }

    /// The TR-31 algorithm byte of keys of this family.
    pub fn tr31_algorithm(self) -> u8 {
        match self {
            KeyFamily::Tdes => b'T',
            KeyFamily::Aes => b'A',
        }
    }

    fn key(self, bytes: SecretBytes) -> Result<SymmetricKey, rki_protocol::keys::KeyError> {
        match self {
            KeyFamily::Tdes => SymmetricKey::tdes(bytes),
            KeyFamily::Aes => SymmetricKey::aes(bytes),
        }
    }
}

/// One clear component as a custodian entered it: the key in hex and its own check value.
/// The hex text is zeroized on drop and never printed.
pub struct Component {
    key_hex: Zeroizing<String>,
    kcv_hex: String,
}

impl Component {
    pub fn new(key_hex: Zeroizing<String>, kcv_hex: String) -> Component {
        Component { key_hex, kcv_hex }
    }
}

impl fmt::Debug for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Component {{ key: [REDACTED], kcv: {:?} }}", self.kcv_hex)
    }
}

/// Why a ceremony step refused its input. Each variant has a stable [`CeremonyError::code`] (the
/// API's problem+json `code`); no message contains key material.
#[derive(Debug, thiserror::Error)]
pub enum CeremonyError {
    #[error("a key is entered as {COMPONENTS_MIN} or {COMPONENTS_MAX} components, not {0}")]
    ComponentCount(usize),
    #[error("component {index}: {reason}")]
    Component { index: usize, reason: String },
    #[error("component {0}'s KCV is not 3 to 5 bytes of hex")]
    ComponentKcvFormat(usize),
    #[error("component {0} does not match its KCV")]
    ComponentKcvMismatch(usize),
    #[error("kcv is not 3 to 5 bytes of hex")]
    KcvFormat,
    #[error("the key does not match the given KCV (its KCV is {0})")]
    KcvMismatch(Kcv),
    #[error("the key block is malformed: {0}")]
    KeyBlockMalformed(String),
    #[error("the key block's MAC does not verify under this KEK: a wrong KEK, or an altered block")]
    KeyBlockMac,
    #[error("the key block needs a {expected} KEK (version {version}); this KEK is {kek}")]
    KeyBlockKekFamily { version: char, expected: &'static str, kek: KeyAlgorithm },
    #[error("key block version {0} is refused: variant binding (A, C) is deprecated; use B (TDES KEK) or D (AES KEK)")]
    KeyBlockVersion(char),
    #[error("key usage {0} is refused: a key source is a BDK, usage B0")]
    KeyBlockUsage(String),
    #[error("mode of use {0:?} is refused: a BDK's mode of use is X (derivation) or N")]
    KeyBlockModeOfUse(char),
    #[error("exportability {0:?} is refused: a BDK is never exported, so the block must say N (non-exportable)")]
    KeyBlockExportability(char),
    #[error("the key block holds a {found} key, but {declared} was declared")]
    KeyBlockAlgorithm { declared: &'static str, found: String },
    #[error("a {bdk} BDK cannot come under a {kek} KEK: the KEK would be the weaker key")]
    KekTooWeak { bdk: KeyAlgorithm, kek: KeyAlgorithm },
    #[error("the key is single DES in disguise: two adjacent TDES key parts are equal")]
    DegenerateKey,
    #[error(transparent)]
    Service(#[from] KeyServiceError),
}

impl CeremonyError {
    /// The stable code of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            CeremonyError::ComponentCount(_) => "bad_components",
            CeremonyError::Component { .. } => "bad_component",
            CeremonyError::ComponentKcvFormat(_) | CeremonyError::KcvFormat => "bad_kcv",
            CeremonyError::ComponentKcvMismatch(_) => "component_kcv_mismatch",
            CeremonyError::KcvMismatch(_) => "kcv_mismatch",
            CeremonyError::KeyBlockMalformed(_) => "key_block_malformed",
            CeremonyError::KeyBlockMac => "key_block_mac_mismatch",
            CeremonyError::KeyBlockKekFamily { .. } => "key_block_kek_mismatch",
            CeremonyError::KeyBlockVersion(_) => "key_block_version_refused",
            CeremonyError::KeyBlockUsage(_) => "key_block_usage_refused",
            CeremonyError::KeyBlockModeOfUse(_) => "key_block_mode_refused",
            CeremonyError::KeyBlockExportability(_) => "key_block_exportability_refused",
            CeremonyError::KeyBlockAlgorithm { .. } => "key_block_algorithm_mismatch",
            CeremonyError::KekTooWeak { .. } => "kek_too_weak",
            CeremonyError::DegenerateKey => "degenerate_key",
            CeremonyError::Service(_) => "internal",
        }
    }

    /// Whether the caller's input was refused (as opposed to the key service failing).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, CeremonyError::Service(_))
    }
}

/// Combines clear components into one key: each is checked against its own KCV (compared in
/// constant time, as long as the custodian gave it, 3 to 5 bytes), then all are XORed.
pub fn combine_components(family: KeyFamily, components: &[Component]) -> Result<SymmetricKey, CeremonyError> {
    if !(COMPONENTS_MIN..=COMPONENTS_MAX).contains(&components.len()) {
        return Err(CeremonyError::ComponentCount(components.len()));
    }
    let mut combined: Option<SecretBytes> = None;
    for (i, c) in components.iter().enumerate() {
        let index = i + 1;
        let bytes = SecretBytes::from_hex(c.key_hex.trim())
            .map_err(|_| CeremonyError::Component { index, reason: "not hex".into() })?;
        let key = family.key(bytes).map_err(|e| CeremonyError::Component { index, reason: e.to_string() })?;
        let kcv = Kcv::from_hex(c.kcv_hex.trim()).ok_or(CeremonyError::ComponentKcvFormat(index))?;
        let actual = key.kcv(KcvLen::Five);
        if !ct_eq(&actual.as_bytes()[..kcv.as_bytes().len()], kcv.as_bytes()) {
            return Err(CeremonyError::ComponentKcvMismatch(index));
        }
        combined = Some(match combined {
            None => key.into_secret(),
            Some(mut acc) => {
                if acc.len() != key.len() {
                    return Err(CeremonyError::Component { index, reason: "components differ in length".into() });
                }
                for (a, b) in acc.expose_secret_mut().iter_mut().zip(key.expose_secret()) {
                    *a ^= b;
                }
                acc
            }
        });
    }
    let bytes = combined.ok_or(CeremonyError::ComponentCount(0))?;
    let key =
        family.key(bytes).map_err(|e| CeremonyError::Component { index: components.len(), reason: e.to_string() })?;
    refuse_degenerate(&key)?;
    Ok(key)
}

/// Refuses a TDES key whose first and second (or second and third) 8-byte parts are the same DES
/// key: TDES with such a key is single DES (EDE with K1 = K2 cancels out). DES ignores each
/// byte's low (parity) bit, so the parts are compared without it, in constant time.
pub fn refuse_degenerate(key: &SymmetricKey) -> Result<(), CeremonyError> {
    if !key.algorithm().is_tdes() {
        return Ok(());
    }
    let mut masked = SecretBytes::from_slice(key.expose_secret());
    masked.expose_secret_mut().iter_mut().for_each(|b| *b &= 0xFE);
    let parts: Vec<&[u8]> = masked.expose_secret().chunks(8).collect();
    if parts.windows(2).any(|pair| ct_eq(pair[0], pair[1])) {
        return Err(CeremonyError::DegenerateKey);
    }
    Ok(())
}

/// Checks `key` against the KCV the key owner expects, if one was given (3 to 5 bytes, constant
/// time).
pub fn check_expected_kcv(key: &SymmetricKey, expected: Option<&str>) -> Result<(), CeremonyError> {
    let Some(expected) = expected else { return Ok(()) };
    let expected = Kcv::from_hex(expected.trim()).ok_or(CeremonyError::KcvFormat)?;
    let actual = key.kcv(KcvLen::Five);
    if !ct_eq(&actual.as_bytes()[..expected.as_bytes().len()], expected.as_bytes()) {
        return Err(CeremonyError::KcvMismatch(key.kcv(KcvLen::Three)));
    }
    Ok(())
}

/// What a TR-31 block must say to be imported as a BDK.
///
/// - **Version** B (TDES KEK) or D (AES KEK). A and C bind the header by key variants, which
///   TR-31:2018 deprecates; they are refused before any cryptography.
/// - **Key usage** `B0`, the BDK. An initial key (`B1`) or a PIN key is not a key source.
/// - **Mode of use** `X` (key derivation), which TR-31 gives `B0`, or `N` (no special
///   restriction), which some HSMs emit for BDKs.
/// - **Exportability** `N`. The gateway never exports a BDK (DESIGN §2), and the key it seals at
///   rest says `N`; a block marked `E` (exportable under a trusted key) or `S` (sensitive,
///   exportable under an untrusted key) states a custody the gateway would not honour, so the
///   key owner re-exports it as `N`.
/// - **Algorithm** the family the key owner declared (`T` for tdes, `A` for aes).
/// - **Strength**: the BDK is no stronger than the KEK it came under (NIST SP 800-57 security
///   strengths: two-key TDES 80 bits, three-key 112, AES its key size). An AES-256 BDK sent
///   under a two-key TDES KEK was only ever as safe as the KEK.
pub struct ImportPolicy;

impl ImportPolicy {
    pub const KEY_USAGE: [u8; 2] = *b"B0";
    pub const MODES_OF_USE: &'static [u8] = b"XN";
    pub const EXPORTABILITY: &'static [u8] = b"N";
}

/// Refuses deprecated versions before the block is opened (the first character is its version).
pub fn check_block_version(block: &str) -> Result<(), CeremonyError> {
    match block.as_bytes().first().copied().and_then(Version::from_byte) {
        Some(Version::B | Version::D) => Ok(()),
        Some(v) => Err(CeremonyError::KeyBlockVersion(char::from(v.as_byte()))),
        None => Err(CeremonyError::KeyBlockMalformed("the first character is not a key block version".into())),
    }
}

/// Maps an unwrap failure to the refusal the key owner needs to read. The header's own checks
/// (TR-31's usage table) run before the MAC: a usage or mode no BDK can have is named as such.
pub fn unwrap_error(e: tr31::Tr31Error) -> CeremonyError {
    let is_bdk = |usage: &str| usage.as_bytes() == ImportPolicy::KEY_USAGE;
    match e {
        tr31::Tr31Error::UnknownKeyUsage(usage) => CeremonyError::KeyBlockUsage(usage),
        tr31::Tr31Error::ModeOfUseNotAllowed { usage, mode } if is_bdk(&usage) => {
            CeremonyError::KeyBlockModeOfUse(mode)
        }
        tr31::Tr31Error::AlgorithmNotAllowed { usage, algorithm } if is_bdk(&usage) => {
            CeremonyError::KeyBlockAlgorithm { declared: "a BDK", found: format!("algorithm {algorithm:?}") }
        }
        tr31::Tr31Error::ModeOfUseNotAllowed { usage, .. } | tr31::Tr31Error::AlgorithmNotAllowed { usage, .. } => {
            CeremonyError::KeyBlockUsage(usage)
        }
        tr31::Tr31Error::MacMismatch => CeremonyError::KeyBlockMac,
        tr31::Tr31Error::KbpkAlgorithm { version, expected, got } => {
            CeremonyError::KeyBlockKekFamily { version: char::from(version.as_byte()), expected, kek: got }
        }
        other => CeremonyError::KeyBlockMalformed(other.to_string()),
    }
}

/// Checks an opened (MAC-verified) block against [`ImportPolicy`] and returns its key as a BDK of
/// `family`.
pub fn check_bdk_block(
    header: &Header,
    key: SecretBytes,
    family: KeyFamily,
    kek: KeyAlgorithm,
) -> Result<SymmetricKey, CeremonyError> {
    if header.key_usage() != ImportPolicy::KEY_USAGE {
        return Err(CeremonyError::KeyBlockUsage(header.key_usage_str().to_string()));
    }
    if !ImportPolicy::MODES_OF_USE.contains(&header.mode_of_use()) {
        return Err(CeremonyError::KeyBlockModeOfUse(char::from(header.mode_of_use())));
    }
    if !ImportPolicy::EXPORTABILITY.contains(&header.exportability()) {
        return Err(CeremonyError::KeyBlockExportability(char::from(header.exportability())));
    }
    if header.algorithm() != family.tr31_algorithm() {
        return Err(CeremonyError::KeyBlockAlgorithm {
            declared: family.as_str(),
            found: format!("algorithm {:?}", char::from(header.algorithm())),
        });
    }
    let bdk = family.key(key).map_err(|e| CeremonyError::KeyBlockMalformed(e.to_string()))?;
    refuse_degenerate(&bdk)?;
    if strength_bits(bdk.algorithm()) > strength_bits(kek) {
        return Err(CeremonyError::KekTooWeak { bdk: bdk.algorithm(), kek });
    }
    Ok(bdk)
}

/// Security strength in bits (NIST SP 800-57 Part 1, Table 2).
fn strength_bits(algorithm: KeyAlgorithm) -> u32 {
    match algorithm {
        KeyAlgorithm::Tdes2 => 80,
        KeyAlgorithm::Tdes3 => 112,
        KeyAlgorithm::Aes128 => 128,
        KeyAlgorithm::Aes192 => 192,
        KeyAlgorithm::Aes256 => 256,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyservice::{DeriveRequest, KeyService, MasterKey, SoftwareKeyService};

    const BDK: &str = "0123456789ABCDEFFEDCBA9876543210";
    const AES_BDK: &str = "FEDCBA9876543210F1F1F1F1F1F1F1F1";
    const KEK_C1: &str = "89ABCDEF0123456776543210FEDCBA98";
    const KEK_C2: &str = "11111111111111112222222222222222";
    const AES_KEK: &str = "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F";

    fn service() -> SoftwareKeyService {
        SoftwareKeyService::new(MasterKey::generate().expect("master key"))
    }

    fn component(family: KeyFamily, hex: &str) -> Component {
        let key = family.key(SecretBytes::from_hex(hex).expect("hex")).expect("key");
        Component::new(Zeroizing::new(hex.to_string()), key.kcv(KcvLen::Three).to_hex())
    }

    /// The KEK as its two components, and the clear KEK they make.
    fn tdes_kek_components() -> (Vec<Component>, SymmetricKey) {
        let c1 = SecretBytes::from_hex(KEK_C1).expect("hex");
        let c2 = SecretBytes::from_hex(KEK_C2).expect("hex");
        let kek: Vec<u8> = c1.expose_secret().iter().zip(c2.expose_secret()).map(|(a, b)| a ^ b).collect();
        let kek = SymmetricKey::tdes(SecretBytes::from_vec(kek)).expect("kek");
        (vec![component(KeyFamily::Tdes, KEK_C1), component(KeyFamily::Tdes, KEK_C2)], kek)
    }

    fn block(kek: &SymmetricKey, header: &str, key: &str) -> String {
        let header = Header::parse(header).expect("header");
        let key = SecretBytes::from_hex(key).expect("hex");
        tr31::wrap(kek, &header, &key, &mut |b: &mut [u8]| b.fill(0x5A)).expect("wrap")
    }

    fn refused(result: Result<crate::keyservice::SealedKey, CeremonyError>) -> &'static str {
        match result {
            Ok(_) => "accepted",
            Err(e) => e.code(),
        }
    }

    #[test]
    fn a_kek_from_components_imports_bdk_blocks_that_derive_like_the_clear_bdk() {
        let service = service();
        let (components, kek) = tdes_kek_components();
        let sealed_kek = service.kek_from_components(KeyFamily::Tdes, &components, None).expect("kek");
        assert_eq!(sealed_kek.kcv, kek.kcv(KcvLen::Three), "the KEK's KCV is shown");
        let aes_kek = SymmetricKey::aes_from_hex(AES_KEK).expect("aes kek");
        let sealed_aes_kek = service
            .kek_from_components(
                KeyFamily::Aes,
                &[component(KeyFamily::Aes, AES_KEK), component(KeyFamily::Aes, &"0".repeat(64))],
                Some(&aes_kek.kcv(KcvLen::Three).to_hex()),
            )
            .expect("aes kek");
        let tdes_bdk = SymmetricKey::tdes_from_hex(BDK).expect("bdk");
        let aes_bdk = SymmetricKey::aes_from_hex(AES_BDK).expect("bdk");
        let cases = [
            (&sealed_kek.sealed, KeyFamily::Tdes, block(&kek, "B0000B0TX00N0000", BDK), &tdes_bdk),
            (&sealed_kek.sealed, KeyFamily::Tdes, block(&kek, "B0000B0TN00N0000", BDK), &tdes_bdk),
            (&sealed_aes_kek.sealed, KeyFamily::Aes, block(&aes_kek, "D0000B0AX00N0000", AES_BDK), &aes_bdk),
            (&sealed_aes_kek.sealed, KeyFamily::Tdes, block(&aes_kek, "D0000B0TX00N0000", BDK), &tdes_bdk),
        ];
        for (sealed_kek, family, key_block, bdk) in cases {
            let kcv = bdk.kcv(KcvLen::Three).to_hex();
            let imported = service.import_bdk(sealed_kek, family, &key_block, Some(&kcv)).expect(&key_block[..16]);
            assert_eq!((imported.algorithm, imported.kcv.to_hex()), (bdk.algorithm(), kcv));
            assert_derives_like(&service, &imported.sealed, bdk);
        }
    }

    /// The sealed BDK is a key source like any other: the initial key it derives for a device is
    /// the one derived here from the clear BDK.
    fn assert_derives_like(service: &SoftwareKeyService, sealed_bdk: &str, bdk: &SymmetricKey) {
        let secrets = rki_protocol::init::DeviceSecrets {
            signing_key: rki_protocol::frame::MacKey::new(SecretBytes::from_slice(&[1; 32])).expect("mac key"),
            kbpk_aes: SymmetricKey::aes(SecretBytes::from_slice(&[2; 32])).expect("aes kbpk"),
            kbpk_tdes: SymmetricKey::tdes(SecretBytes::from_slice(&[3; 24])).expect("tdes kbpk"),
            mqtt_password: SecretBytes::from_slice(&[b'A'; 64]),
        };
        let sealed = service.seal_device_secrets(&secrets).expect("secrets");
        let (key_id, kbpk, sealed_kbpk, expected) = if bdk.algorithm().is_tdes() {
            let ksn = crate::keyservice::tdes_initial_ksn(&[0xFF, 0xFF, 0x98, 0x76, 0x54], 7).expect("ksn");
            let ipek = rki_protocol::dukpt::tdes::derive_ipek(bdk, &ksn).expect("ipek");
            (ksn.as_bytes().to_vec(), &secrets.kbpk_tdes, &sealed.kbpk_tdes, ipek)
        } else {
            let id = crate::keyservice::aes_initial_key_id(&[1, 2, 3, 4], 7).expect("id");
            let key = rki_protocol::dukpt::aes::derive_initial_key(bdk, &id).expect("initial key");
            (id.as_bytes().to_vec(), &secrets.kbpk_aes, &sealed.kbpk_aes, key)
        };
        let request = [DeriveRequest { key_id: &key_id, sealed_kbpk }];
        let wrapped = service.derive_and_wrap(sealed_bdk, &request).expect("batch").remove(0).expect("derived");
        let (_, key) = tr31::unwrap(kbpk, &wrapped.key_block).expect("opens");
        assert!(key == *expected.secret(), "the imported BDK derives as the clear one");
    }

    /// Valid blocks pass; each way a block can be wrong is refused with its own code.
    #[test]
    fn import_refuses_each_bad_block_with_its_code() {
        let service = service();
        let (components, kek) = tdes_kek_components();
        let sealed_kek = service.kek_from_components(KeyFamily::Tdes, &components, None).expect("kek").sealed;
        let other_kek = SymmetricKey::tdes_from_hex("00112233445566778899AABBCCDDEEFF").expect("kek");
        let aes_kek = SymmetricKey::aes_from_hex(AES_KEK).expect("aes kek");
        let good = block(&kek, "B0000B0TX00N0000", BDK);
        let tampered_payload = {
            let mut b = good.clone().into_bytes();
            let at = 16 + 3;
            b[at] = if b[at] == b'0' { b'1' } else { b'0' };
            String::from_utf8(b).expect("ascii")
        };
        // The header says N; an attacker who makes it E breaks the MAC.
        let tampered_header = good.replacen("B0TX00N", "B0TX00E", 1);
        let cases: Vec<(&str, KeyFamily, String, &str)> = vec![
            ("valid", KeyFamily::Tdes, good.clone(), "accepted"),
            ("wrong KEK", KeyFamily::Tdes, block(&other_kek, "B0000B0TX00N0000", BDK), "key_block_mac_mismatch"),
            ("tampered payload", KeyFamily::Tdes, tampered_payload, "key_block_mac_mismatch"),
            ("tampered header", KeyFamily::Tdes, tampered_header, "key_block_mac_mismatch"),
            ("truncated", KeyFamily::Tdes, good[..good.len() - 2].to_string(), "key_block_malformed"),
            ("not a block", KeyFamily::Tdes, "hello".into(), "key_block_malformed"),
            ("usage B1", KeyFamily::Tdes, block(&kek, "B0000B1TX00N0000", BDK), "key_block_usage_refused"),
            ("usage K0", KeyFamily::Tdes, block(&kek, "B0000K0TB00N0000", BDK), "key_block_usage_refused"),
            ("usage P0", KeyFamily::Tdes, block(&kek, "B0000P0TE00N0000", BDK), "key_block_usage_refused"),
            ("exportable", KeyFamily::Tdes, block(&kek, "B0000B0TX00E0000", BDK), "key_block_exportability_refused"),
            ("mode E", KeyFamily::Tdes, good.replacen("B0TX00N", "B0TE00N", 1), "key_block_mode_refused"),
            ("HMAC BDK", KeyFamily::Tdes, good.replacen("B0TX00N", "B0HX00N", 1), "key_block_algorithm_mismatch"),
            ("unknown usage", KeyFamily::Tdes, good.replacen("B0TX00N", "Q7TX00N", 1), "key_block_usage_refused"),
            ("sensitive", KeyFamily::Tdes, block(&kek, "B0000B0TX00S0000", BDK), "key_block_exportability_refused"),
            ("declared aes", KeyFamily::Aes, good.clone(), "key_block_algorithm_mismatch"),
            (
                "declared tdes",
                KeyFamily::Tdes,
                block(&kek, "B0000B0AX00N0000", AES_BDK),
                "key_block_algorithm_mismatch",
            ),
            ("AES BDK, 2-key KEK", KeyFamily::Aes, block(&kek, "B0000B0AX00N0000", AES_BDK), "kek_too_weak"),
            (
                "version D, TDES KEK",
                KeyFamily::Tdes,
                block(&aes_kek, "D0000B0TX00N0000", BDK),
                "key_block_kek_mismatch",
            ),
            (
                "single DES BDK",
                KeyFamily::Tdes,
                block(&kek, "B0000B0TX00N0000", &"0123456789ABCDEF".repeat(2)),
                "degenerate_key",
            ),
            ("version A", KeyFamily::Tdes, format!("A{}", &good[1..]), "key_block_version_refused"),
            ("version C", KeyFamily::Tdes, format!("C{}", &good[1..]), "key_block_version_refused"),
        ];
        for (what, family, key_block, code) in cases {
            assert_eq!(refused(service.import_bdk(&sealed_kek, family, &key_block, None)), code, "{what}");
        }
        let wrong_kcv = service.import_bdk(&sealed_kek, KeyFamily::Tdes, &good, Some("000000"));
        assert_eq!(refused(wrong_kcv), "kcv_mismatch");
    }

    #[test]
    fn components_with_a_wrong_kcv_or_count_are_refused() {
        let service = service();
        let c = |hex: &str, kcv: &str| Component::new(Zeroizing::new(hex.into()), kcv.into());
        let zero = "0".repeat(32);
        let cases: Vec<(&str, Vec<Component>, Option<&str>, &str)> = vec![
            ("good", vec![c(BDK, "08D7B4"), c(&zero, "8CA64D")], Some("08D7B4"), "accepted"),
            ("five-byte KCVs", vec![c(BDK, "08D7B4FB62"), c(&zero, "8CA64DE9C1")], None, "accepted"),
            ("wrong KCV", vec![c(BDK, "08D7B4"), c(&zero, "000000")], None, "component_kcv_mismatch"),
            ("KCV not hex", vec![c(BDK, "08D7B4"), c(&zero, "zz")], None, "bad_kcv"),
            ("one", vec![c(BDK, "08D7B4")], None, "bad_components"),
            ("four", (0..4).map(|_| c(&zero, "8CA64D")).collect(), None, "bad_components"),
            ("not hex", vec![c("XY", "08D7B4"), c(&zero, "8CA64D")], None, "bad_component"),
            ("lengths", vec![c(BDK, "08D7B4"), c(&"0".repeat(48), "8CA64D")], None, "bad_component"),
            ("combined KCV", vec![c(BDK, "08D7B4"), c(&zero, "8CA64D")], Some("111111"), "kcv_mismatch"),
            (
                "single DES",
                vec![c(BDK, "08D7B4"), c("0000000000000000FFFFFFFFFFFFFFFF", "9295B5")],
                None,
                "degenerate_key",
            ),
        ];
        for (what, components, kcv, code) in cases {
            assert_eq!(refused(service.bdk_from_components(KeyFamily::Tdes, &components, kcv)), code, "BDK: {what}");
            assert_eq!(refused(service.kek_from_components(KeyFamily::Tdes, &components, kcv)), code, "KEK: {what}");
        }
    }

    /// A KEK is sealed as `K0`/`D`: the key service refuses it where a BDK is expected, and a BDK
    /// where a KEK is expected.
    #[test]
    fn a_kek_never_derives_and_a_bdk_never_unwraps() {
        let service = service();
        let (components, kek) = tdes_kek_components();
        let sealed_kek = service.kek_from_components(KeyFamily::Tdes, &components, None).expect("kek").sealed;
        let sealed_bdk = service.seal_bdk(&SymmetricKey::tdes_from_hex(BDK).expect("bdk")).expect("bdk").sealed;
        let secrets = rki_protocol::init::DeviceSecrets {
            signing_key: rki_protocol::frame::MacKey::new(SecretBytes::from_slice(&[1; 32])).expect("mac key"),
            kbpk_aes: SymmetricKey::aes(SecretBytes::from_slice(&[2; 32])).expect("aes kbpk"),
            kbpk_tdes: SymmetricKey::tdes(SecretBytes::from_slice(&[3; 16])).expect("tdes kbpk"),
            mqtt_password: SecretBytes::from_slice(&[b'A'; 64]),
        };
        let kbpk = service.seal_device_secrets(&secrets).expect("secrets").kbpk_tdes;
        let ksn = crate::keyservice::tdes_initial_ksn(&[0xFF, 0xFF, 0x98, 0x76, 0x54], 0).expect("ksn");
        let request = [DeriveRequest { key_id: ksn.as_bytes(), sealed_kbpk: &kbpk }];
        assert!(service.derive_and_wrap(&sealed_bdk, &request).expect("batch")[0].is_ok(), "a BDK derives");
        let refused = service.derive_and_wrap(&sealed_kek, &request);
        assert!(matches!(refused, Err(KeyServiceError::WrongUsage { .. })), "a KEK derives: {refused:?}");
        let good = block(&kek, "B0000B0TX00N0000", BDK);
        assert!(service.import_bdk(&sealed_kek, KeyFamily::Tdes, &good, None).is_ok(), "a KEK unwraps");
        let refused = service.import_bdk(&sealed_bdk, KeyFamily::Tdes, &good, None);
        assert!(
            matches!(refused, Err(CeremonyError::Service(KeyServiceError::WrongUsage { .. }))),
            "a BDK unwraps: {refused:?}"
        );
        // A device's KBPK is neither.
        let refused = service.import_bdk(&kbpk, KeyFamily::Tdes, &good, None);
        assert!(matches!(refused, Err(CeremonyError::Service(KeyServiceError::WrongUsage { .. }))), "{refused:?}");
    }

    #[test]
    fn debug_of_a_component_and_of_refusals_shows_no_key_bytes() {
        let component = Component::new(Zeroizing::new(BDK.into()), "08D7B4".into());
        let shown = format!("{component:?}");
        assert!(!shown.contains("0123456789") && !shown.contains("FEDCBA"), "{shown}");
        assert!(shown.contains("REDACTED"), "{shown}");
        let errors =
            [combine_components(KeyFamily::Tdes, &[component, Component::new(Zeroizing::new(BDK.into()), "1".into())])];
        for e in errors {
            let e = e.expect_err("refused");
            let shown = format!("{e:?} {e}");
            assert!(!shown.contains("0123456789"), "{shown}");
        }
    }
}
