//! The key service: the one narrow interface behind which key material lives.
//!
//! Everything that touches a clear key (a BDK, a derived IPEK, a device's signing key or key-block
//! protection keys) happens behind [`KeyService`]. The rest of the gateway only ever handles sealed
//! keys (TR-31 key blocks under the master key, as stored), KCVs and key blocks wrapped for a
//! device. [`SoftwareKeyService`] is the implementation in this process; an HSM implementation
//! (PKCS#11) replaces it without touching the engine.
//!
//! At rest every key is a TR-31 version D key block under the master key (AES-256): BDKs with
//! usage `B0`, key-encryption keys with `K0` (mode `D`: they only unwrap), key-block protection
//! keys with `K1`, device signing keys with `M7` (HMAC), and each GUDID's MAC key with `M7` and
//! the proprietary optional block `0G` ([`GUDID_MAC_BLOCK`]). Unsealing checks the usage, so a key
//! sealed as one kind is refused where another is expected: a KEK never derives, a BDK never
//! unwraps, a GUDID's MAC key never signs a device's frames and a device's signing key never
//! passes for a GUDID's.
//!
//! Keys enter at the key ceremony ([`ceremony`]): as clear components, or as TR-31 blocks under a
//! KEK.

pub mod ceremony;

use std::fs;
use std::io::Write as _;
use std::path::Path;

use rki_protocol::dukpt;
use rki_protocol::frame::MacKey;
use rki_protocol::init::DeviceSecrets;
use rki_protocol::tr31::{self, DukptInitialKeyId, Header, Version};
use rki_protocol::{Kcv, KcvLen, KeyAlgorithm, SecretBytes, SymmetricKey};
use zeroize::Zeroizing;

use self::ceremony::{CeremonyError, Component, KeyFamily};

/// Errors of the key service. Messages never contain key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyServiceError {
    #[error("master key file {path}: {reason}")]
    MasterKeyFile { path: String, reason: String },
    #[error("sealed key does not open under this master key (wrong master key, or tampered store)")]
    Unseal,
    #[error("key block: {0}")]
    Tr31(String),
    #[error("derivation: {0}")]
    Derivation(String),
    #[error("no randomness available")]
    Random,
    #[error("key: {0}")]
    Key(String),
    #[error("a sealed {found} key was given where a {expected} key is expected")]
    WrongUsage { expected: &'static str, found: String },
}

/// The master key: AES-256, kept in a file outside the store, never logged.
pub struct MasterKey(SymmetricKey);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey([REDACTED])")
    }
}

impl MasterKey {
    /// Loads the master key from `path`, or creates one (mode 0600) if the file does not exist.
    /// Returns whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(MasterKey, bool), KeyServiceError> {
        let err = |reason: String| KeyServiceError::MasterKeyFile { path: path.display().to_string(), reason };
        if path.exists() {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = fs::metadata(path).map_err(|e| err(e.to_string()))?.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(err(format!("permissions {:o} are too open; run chmod 600 on it", mode & 0o777)));
                }
            }
            let raw = Zeroizing::new(fs::read(path).map_err(|e| err(e.to_string()))?);
            return Self::parse(&raw).map(|key| (key, false)).map_err(err);
        }
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            }
        }
        let key = SymmetricKey::random(KeyAlgorithm::Aes256).map_err(|_| KeyServiceError::Random)?;
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| err(e.to_string()))?;
        let text = key.secret().to_hex_upper();
        file.write_all(text.as_bytes())
            .and_then(|_| file.write_all(b"\n"))
            .and_then(|_| file.sync_all())
            .map_err(|e| err(e.to_string()))?;
        Ok((MasterKey(key), true))
    }

    /// The master key file's contents: 64 hexadecimal digits (an AES-256 key), on one line. Every
    /// refusal says what was expected and what was found, never the file's bytes.
    fn parse(raw: &[u8]) -> Result<MasterKey, String> {
        const EXPECTED: &str = "expected 64 hexadecimal digits (an AES-256 key) on one line, as the gateway writes it";
        let Ok(text) = std::str::from_utf8(raw) else {
            return Err(format!(
                "{EXPECTED}; found {} bytes that are not text (a raw binary key? write it as hex: xxd -p -c 64)",
                raw.len()
            ));
        };
        let text = text.trim();
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            let digits = text.bytes().filter(u8::is_ascii_hexdigit).count();
            return Err(format!("{EXPECTED}; found {} characters, {digits} of them hexadecimal digits", text.len()));
        }
        let bytes = SecretBytes::from_hex(text).map_err(|_| EXPECTED.to_string())?;
        SymmetricKey::new(KeyAlgorithm::Aes256, bytes).map(MasterKey).map_err(|_| EXPECTED.to_string())
    }

    /// A fresh random master key (not yet written anywhere).
    pub fn generate() -> Result<MasterKey, KeyServiceError> {
        SymmetricKey::random(KeyAlgorithm::Aes256).map(MasterKey).map_err(|_| KeyServiceError::Random)
    }

    /// Writes the key to `path` (created, mode 0600; fails if it exists).
    pub fn write_new(&self, path: &Path) -> Result<(), KeyServiceError> {
        let err = |reason: String| KeyServiceError::MasterKeyFile { path: path.display().to_string(), reason };
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| err(e.to_string()))?;
        let text = self.0.secret().to_hex_upper();
        file.write_all(text.as_bytes())
            .and_then(|_| file.write_all(b"\n"))
            .and_then(|_| file.sync_all())
            .map_err(|e| err(e.to_string()))
    }

    /// Opens a key sealed under this master key and seals it again under `new`, header unchanged.
    pub fn reseal(&self, sealed: &str, new: &MasterKey) -> Result<String, KeyServiceError> {
        let (header, key) = tr31::unwrap(&self.0, sealed).map_err(|_| KeyServiceError::Unseal)?;
        tr31::wrap(&new.0, &header, &key, &mut os_random).map_err(|e| KeyServiceError::Tr31(e.to_string()))
    }

    /// KCV of the master key, stored in the database to detect a wrong master key at start.
    pub fn kcv(&self) -> Kcv {
        self.0.kcv(KcvLen::Three)
    }
}

/// The proprietary TR-31 optional block (IDs starting with a digit are proprietary) that marks a
/// sealed GUDID MAC key, so that it and a device's signing key (both `M7`) are never taken for
/// each other.
pub const GUDID_MAC_BLOCK: [u8; 2] = *b"0G";
const GUDID_MAC_BLOCK_DATA: &str = "GUDID";
/// The proprietary optional block that marks a sealed backend MAC key (`docs/PROTOCOL.md`
/// §12.1), so that it is never taken for a GUDID's MAC key or a device's signing key (all `M7`).
pub const BACKEND_MAC_BLOCK: [u8; 2] = *b"0B";
const BACKEND_MAC_BLOCK_DATA: &str = "BACKEND";

/// A BDK sealed for storage, with its public facts.
#[derive(Debug, Clone)]
pub struct SealedKey {
    pub sealed: String,
    pub algorithm: KeyAlgorithm,
    pub kcv: Kcv,
}

/// A device's secrets, sealed for storage.
#[derive(Debug, Clone)]
pub struct SealedDeviceSecrets {
    pub signing_key: String,
    pub kbpk_aes: String,
    pub kbpk_tdes: String,
}

/// One key to derive and wrap for one device.
#[derive(Debug, Clone, Copy)]
pub struct DeriveRequest<'a> {
    /// KSN (TDES, counter zero) or initial key ID (AES) of the key to derive: unique per device
    /// (see [`tdes_initial_ksn`] and [`aes_initial_key_id`]).
    pub key_id: &'a [u8],
    /// The device's sealed key-block protection key for the BDK's family (AES or TDES).
    pub sealed_kbpk: &'a str,
}

/// A derived initial key, wrapped for one device. Contains no clear key.
#[derive(Debug, Clone)]
pub struct WrappedKey {
    pub key_block: String,
    /// KSN (TDES, 10 bytes, counter zero) or initial key ID (AES, 8 bytes).
    pub key_id: Vec<u8>,
    pub kcv: Kcv,
}

pub trait KeyService: Send + Sync {
    /// Seals a BDK entered at a key ceremony.
    fn seal_bdk(&self, bdk: &SymmetricKey) -> Result<SealedKey, KeyServiceError>;
    /// Key ceremony: combines 2 or 3 clear components, each checked against its own KCV, into a
    /// BDK of `family`; checks it against `kcv` if the key owner gave one; seals it (`B0`).
    fn bdk_from_components(
        &self,
        family: KeyFamily,
        components: &[Component],
        kcv: Option<&str>,
    ) -> Result<SealedKey, CeremonyError>;
    /// Key ceremony: the same for a key-encryption key, sealed as `K0` with mode `D`: only
    /// [`KeyService::import_bdk`] ever opens it.
    fn kek_from_components(
        &self,
        family: KeyFamily,
        components: &[Component],
        kcv: Option<&str>,
    ) -> Result<SealedKey, CeremonyError>;
    /// Opens a BDK sent as a TR-31 key block under the sealed KEK, checks the block against
    /// [`ceremony::ImportPolicy`] and the BDK against `kcv` if given, and seals it as a BDK.
    fn import_bdk(
        &self,
        sealed_kek: &str,
        family: KeyFamily,
        key_block: &str,
        kcv: Option<&str>,
    ) -> Result<SealedKey, CeremonyError>;
    /// Seals a device's new secrets.
    fn seal_device_secrets(&self, secrets: &DeviceSecrets) -> Result<SealedDeviceSecrets, KeyServiceError>;
    /// Opens a device signing key, for verifying its messages and signing those sent to it.
    fn open_signing_key(&self, sealed: &str) -> Result<MacKey, KeyServiceError>;
    /// Seals a GUDID's MAC key (`gudid_mac_key`, PROTOCOL.md §7.2) for the store: the key that
    /// tags `CreateKey` and its answer and salts the device secrets' HKDF. Stored only sealed, so
    /// a copy of the store cannot run an initialisation.
    fn seal_gudid_mac_key(&self, key: &MacKey) -> Result<String, KeyServiceError>;
    /// Opens a sealed GUDID MAC key; a key sealed as anything else is refused.
    fn open_gudid_mac_key(&self, sealed: &str) -> Result<MacKey, KeyServiceError>;
    /// Seals a backend's frame MAC key (`docs/PROTOCOL.md` §12.1) for the store, marked as such
    /// (block `0B`): it opens only as a backend MAC key.
    fn seal_backend_mac_key(&self, key: &MacKey) -> Result<String, KeyServiceError>;
    /// Opens a sealed backend MAC key; a key sealed as anything else is refused.
    fn open_backend_mac_key(&self, sealed: &str) -> Result<MacKey, KeyServiceError>;
    /// Derives the DUKPT initial key of each request from the sealed BDK and wraps it under the
    /// device's KBPK: TR-31 version B for TDES, version D for AES. Spreads the work over the
    /// machine's cores. Used at task creation and to re-wrap after a re-initialisation.
    fn derive_and_wrap(
        &self,
        sealed_bdk: &str,
        requests: &[DeriveRequest<'_>],
    ) -> Result<Vec<Result<WrappedKey, KeyServiceError>>, KeyServiceError>;
}

/// Key service with keys in this process's memory, sealed at rest under the master key.
pub struct SoftwareKeyService {
    master: MasterKey,
    /// The master key with its TR-31 block keys derived once: every device's sealed KBPK is
    /// opened under it for each derivation.
    opener: tr31::PreparedKbpk,
    /// Worker threads for bulk derivation.
    threads: usize,
}

impl SoftwareKeyService {
    pub fn new(master: MasterKey) -> Self {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let opener = tr31::PreparedKbpk::new(&master.0);
        Self { master, opener, threads }
    }

    fn seal(&self, usage: [u8; 2], algorithm: u8, mode: u8, key: &SymmetricKey) -> Result<String, KeyServiceError> {
        let header = Header::builder(Version::D, usage, algorithm, mode)
            .exportability(b'N')
            .build()
            .map_err(|e| KeyServiceError::Tr31(e.to_string()))?;
        tr31::wrap(&self.master.0, &header, key.secret(), &mut os_random)
            .map_err(|e| KeyServiceError::Tr31(e.to_string()))
    }

    fn unseal(&self, sealed: &str) -> Result<(Header, SecretBytes), KeyServiceError> {
        self.opener.unwrap(sealed).map_err(|_| KeyServiceError::Unseal)
    }

    /// Opens a sealed key that must be of kind `kind` (its usage, and its mode of use where the
    /// kind fixes one).
    fn unseal_key(&self, sealed: &str, kind: SealedKind) -> Result<SymmetricKey, KeyServiceError> {
        let (header, bytes) = self.unseal(sealed)?;
        if header.key_usage() != kind.usage() || kind.mode().is_some_and(|mode| header.mode_of_use() != mode) {
            return Err(KeyServiceError::WrongUsage {
                expected: kind.name(),
                found: format!("{}/{}", header.key_usage_str(), char::from(header.mode_of_use())),
            });
        }
        let key = match header.algorithm() {
            b'T' => SymmetricKey::tdes(bytes),
            b'A' => SymmetricKey::aes(bytes),
            _ => return Err(KeyServiceError::Unseal),
        };
        key.map_err(|e| KeyServiceError::Key(e.to_string()))
    }

    /// Derives and wraps every request, two at a time: the TR-31 B wraps of two devices are
    /// interleaved ([`tr31::wrap_pair`]), and the padding comes from one buffered CSPRNG read.
    fn derive_all(&self, bdk: &Bdk<'_>, requests: &[DeriveRequest<'_>]) -> Vec<Result<WrappedKey, KeyServiceError>> {
        let mut padding = Padding::new();
        let mut rng = |buf: &mut [u8]| padding.fill(buf);
        let mut out = Vec::with_capacity(requests.len());
        for pair in requests.chunks(2) {
            let [first, second] = pair else {
                out.extend(pair.iter().map(|r| self.derive_key(bdk, r).and_then(|d| d.wrap(&mut rng))));
                continue;
            };
            match (self.derive_key(bdk, first), self.derive_key(bdk, second)) {
                (Ok(a), Ok(b)) => {
                    let [block_a, block_b] = tr31::wrap_pair(
                        (&a.kbpk, &a.header, a.key.secret()),
                        (&b.kbpk, &b.header, b.key.secret()),
                        &mut rng,
                    );
                    out.push(a.finish(block_a));
                    out.push(b.finish(block_b));
                }
                (a, b) => {
                    out.push(a.and_then(|d| d.wrap(&mut rng)));
                    out.push(b.and_then(|d| d.wrap(&mut rng)));
                }
            }
        }
        out
    }

    /// One device's initial key, derived, with its KBPK opened and its key block header made.
    fn derive_key(&self, bdk: &Bdk<'_>, request: &DeriveRequest<'_>) -> Result<Derived, KeyServiceError> {
        let kbpk = self.unseal_key(request.sealed_kbpk, SealedKind::Kbpk)?;
        let id_error = |e: rki_protocol::dukpt::DukptError| KeyServiceError::Derivation(e.to_string());
        // The initial key, its ID as the block's KS or IK, and the TR-31 version of its family.
        let (key, id, version) = match bdk {
            Bdk::Tdes(deriver) => {
                if !kbpk.algorithm().is_tdes() {
                    return Err(KeyServiceError::Key("a TDES key needs a TDES key-block protection key".into()));
                }
                let ksn = dukpt::tdes::Ksn::new(key_id_bytes(request.key_id, "TDES KSN")?);
                (deriver.derive(&ksn), DukptInitialKeyId::Tdes(ksn), Version::B)
            }
            Bdk::Aes(bdk) => {
                if !kbpk.algorithm().is_aes() {
                    return Err(KeyServiceError::Key("an AES key needs an AES key-block protection key".into()));
                }
                let id = dukpt::aes::InitialKeyId::new(key_id_bytes(request.key_id, "AES DUKPT initial key ID")?);
                (dukpt::aes::derive_initial_key(bdk, &id).map_err(id_error)?, DukptInitialKeyId::Aes(id), Version::D)
            }
        };
        let key_id = match &id {
            DukptInitialKeyId::Tdes(ksn) => ksn.as_bytes().to_vec(),
            DukptInitialKeyId::Aes(id) => id.as_bytes().to_vec(),
        };
        let kcv = key.kcv(KcvLen::Three);
        let header =
            Header::dukpt_initial_key(version, id, Some(&kcv)).map_err(|e| KeyServiceError::Tr31(e.to_string()))?;
        Ok(Derived { kbpk, key, key_id, kcv, header })
    }
}

/// A device's derived initial key before its wrap: the clear key and the device's opened KBPK
/// (both zeroized on drop), the key's ID and check value, the key block header.
struct Derived {
    kbpk: SymmetricKey,
    key: SymmetricKey,
    key_id: Vec<u8>,
    kcv: Kcv,
    header: Header,
}

impl Derived {
    fn wrap(self, rng: &mut dyn FnMut(&mut [u8])) -> Result<WrappedKey, KeyServiceError> {
        let block = tr31::wrap(&self.kbpk, &self.header, self.key.secret(), rng);
        self.finish(block)
    }

    fn finish(self, block: Result<String, tr31::Tr31Error>) -> Result<WrappedKey, KeyServiceError> {
        let key_block = block.map_err(|e| KeyServiceError::Tr31(e.to_string()))?;
        Ok(WrappedKey { key_block, key_id: self.key_id, kcv: self.kcv })
    }
}

/// TR-31 padding bytes from the OS CSPRNG, read [`Padding::BUFFER`] bytes at a time: one
/// system call per few hundred key blocks instead of one per block. Padding is encrypted with
/// the key it pads and only hides the key's length; the buffer is zeroized on drop all the same.
struct Padding {
    buffer: Zeroizing<[u8; Padding::BUFFER]>,
    used: usize,
}

impl Padding {
    const BUFFER: usize = 4096;

    fn new() -> Self {
        Self { buffer: Zeroizing::new([0u8; Self::BUFFER]), used: Self::BUFFER }
    }

    fn fill(&mut self, out: &mut [u8]) {
        if out.len() > Self::BUFFER {
            os_random(out);
            return;
        }
        if Self::BUFFER - self.used < out.len() {
            os_random(&mut self.buffer[..]);
            self.used = 0;
        }
        out.copy_from_slice(&self.buffer[self.used..self.used + out.len()]);
        self.used += out.len();
    }
}

/// A task's BDK, ready for deriving each terminal's key: a TDES BDK is scheduled once for the
/// whole batch (the key schedule costs about as much as one derivation).
enum Bdk<'a> {
    Tdes(Box<dukpt::tdes::IpekDeriver>),
    Aes(&'a SymmetricKey),
}

impl<'a> Bdk<'a> {
    fn new(bdk: &'a SymmetricKey) -> Result<Self, KeyServiceError> {
        if bdk.algorithm().is_tdes() {
            let deriver = dukpt::tdes::IpekDeriver::new(bdk).map_err(|e| KeyServiceError::Derivation(e.to_string()))?;
            Ok(Bdk::Tdes(Box::new(deriver)))
        } else {
            Ok(Bdk::Aes(bdk))
        }
    }
}

/// Fills `buf` from the OS CSPRNG (TR-31 padding).
fn os_random(buf: &mut [u8]) {
    if getrandom::getrandom(buf).is_err() {
        // Padding randomness is not a secret; a zero pad is still a valid key block.
        buf.fill(0);
    }
}

/// The initial KSN of serial `serial` under a 5-byte key set ID: the 59 leading bits are
/// `key_set_id << 19 | serial` (serial overflowing 19 bits carries into the key set ID's low
/// bits, still unique per key source), the 21-bit counter is zero.
pub fn tdes_initial_ksn(key_set_id: &[u8], serial: u64) -> Result<dukpt::tdes::Ksn, KeyServiceError> {
    if key_set_id.len() != 5 {
        return Err(KeyServiceError::Derivation("a TDES key set ID is 5 bytes".into()));
    }
    let mut ksi = [0u8; 8];
    ksi[3..].copy_from_slice(key_set_id);
    let upper59 = (u128::from(u64::from_be_bytes(ksi)) << 19) + u128::from(serial);
    let value = (upper59 & ((1u128 << 59) - 1)) << 21;
    let bytes = value.to_be_bytes();
    let mut ksn = [0u8; 10];
    ksn.copy_from_slice(&bytes[6..]);
    Ok(dukpt::tdes::Ksn::new(ksn))
}

/// A stored key ID as the fixed-size identifier it must be.
fn key_id_bytes<const N: usize>(key_id: &[u8], what: &str) -> Result<[u8; N], KeyServiceError> {
    key_id.try_into().map_err(|_| KeyServiceError::Derivation(format!("a {what} is {N} bytes, not {}", key_id.len())))
}

/// The AES DUKPT initial key ID of serial `serial`: 4-byte BDK ID, then the serial as the 4-byte
/// derivation ID.
pub fn aes_initial_key_id(key_set_id: &[u8], serial: u64) -> Result<dukpt::aes::InitialKeyId, KeyServiceError> {
    if key_set_id.len() != 4 {
        return Err(KeyServiceError::Derivation("an AES BDK ID is 4 bytes".into()));
    }
    let derivation_id =
        u32::try_from(serial).map_err(|_| KeyServiceError::Derivation("serials exhausted for this BDK".into()))?;
    let mut id = [0u8; 8];
    id[..4].copy_from_slice(key_set_id);
    id[4..].copy_from_slice(&derivation_id.to_be_bytes());
    Ok(dukpt::aes::InitialKeyId::new(id))
}

impl KeyService for SoftwareKeyService {
    fn seal_bdk(&self, bdk: &SymmetricKey) -> Result<SealedKey, KeyServiceError> {
        self.seal_as(SealedKind::Bdk, bdk)
    }

    fn bdk_from_components(
        &self,
        family: KeyFamily,
        components: &[Component],
        kcv: Option<&str>,
    ) -> Result<SealedKey, CeremonyError> {
        let bdk = ceremony::combine_components(family, components)?;
        ceremony::check_expected_kcv(&bdk, kcv)?;
        Ok(self.seal_as(SealedKind::Bdk, &bdk)?)
    }

    fn kek_from_components(
        &self,
        family: KeyFamily,
        components: &[Component],
        kcv: Option<&str>,
    ) -> Result<SealedKey, CeremonyError> {
        let kek = ceremony::combine_components(family, components)?;
        ceremony::check_expected_kcv(&kek, kcv)?;
        Ok(self.seal_as(SealedKind::Kek, &kek)?)
    }

    fn import_bdk(
        &self,
        sealed_kek: &str,
        family: KeyFamily,
        key_block: &str,
        kcv: Option<&str>,
    ) -> Result<SealedKey, CeremonyError> {
        let key_block = key_block.trim();
        ceremony::check_block_version(key_block)?;
        let kek = self.unseal_key(sealed_kek, SealedKind::Kek)?;
        let (header, key) = tr31::unwrap(&kek, key_block).map_err(ceremony::unwrap_error)?;
        let bdk = ceremony::check_bdk_block(&header, key, family, kek.algorithm())?;
        ceremony::check_expected_kcv(&bdk, kcv)?;
        Ok(self.seal_as(SealedKind::Bdk, &bdk)?)
    }

    fn seal_device_secrets(&self, s: &DeviceSecrets) -> Result<SealedDeviceSecrets, KeyServiceError> {
        let signing = SymmetricKey::aes(SecretBytes::from_slice(s.signing_key.expose_secret()))
            .map_err(|e| KeyServiceError::Key(e.to_string()))?;
        Ok(SealedDeviceSecrets {
            // The signing key is an HMAC key; it is 32 bytes, so it is carried as key material of
            // that length under usage M7 / algorithm H.
            signing_key: self.seal_hmac(&signing)?,
            kbpk_aes: self.seal(*b"K1", b'A', b'B', &s.kbpk_aes)?,
            kbpk_tdes: self.seal(*b"K1", b'T', b'B', &s.kbpk_tdes)?,
        })
    }

    fn open_signing_key(&self, sealed: &str) -> Result<MacKey, KeyServiceError> {
        let (header, bytes) = self.unseal(sealed)?;
        if header.key_usage() != *b"M7"
            || header.optional_block(GUDID_MAC_BLOCK).is_some()
            || header.optional_block(BACKEND_MAC_BLOCK).is_some()
        {
            return Err(KeyServiceError::Unseal);
        }
        MacKey::new(bytes).map_err(|_| KeyServiceError::Unseal)
    }

    fn seal_backend_mac_key(&self, key: &MacKey) -> Result<String, KeyServiceError> {
        self.seal_marked_mac_key(key, BACKEND_MAC_BLOCK, BACKEND_MAC_BLOCK_DATA)
    }

    fn open_backend_mac_key(&self, sealed: &str) -> Result<MacKey, KeyServiceError> {
        let (header, bytes) = self.unseal(sealed)?;
        if header.key_usage() != *b"M7"
            || header.optional_block(BACKEND_MAC_BLOCK) != Some(BACKEND_MAC_BLOCK_DATA)
            || header.optional_block(GUDID_MAC_BLOCK).is_some()
        {
            return Err(KeyServiceError::WrongUsage {
                expected: "backend MAC key (M7, block 0B)",
                found: header.key_usage_str().to_string(),
            });
        }
        MacKey::new(bytes).map_err(|_| KeyServiceError::Unseal)
    }

    fn seal_gudid_mac_key(&self, key: &MacKey) -> Result<String, KeyServiceError> {
        self.seal_marked_mac_key(key, GUDID_MAC_BLOCK, GUDID_MAC_BLOCK_DATA)
    }

    fn open_gudid_mac_key(&self, sealed: &str) -> Result<MacKey, KeyServiceError> {
        let (header, bytes) = self.unseal(sealed)?;
        if header.key_usage() != *b"M7" || header.optional_block(GUDID_MAC_BLOCK) != Some(GUDID_MAC_BLOCK_DATA) {
            return Err(KeyServiceError::WrongUsage {
                expected: "GUDID MAC key (M7, block 0G)",
                found: header.key_usage_str().to_string(),
            });
        }
        MacKey::new(bytes).map_err(|_| KeyServiceError::Unseal)
    }

    fn derive_and_wrap(
        &self,
        sealed_bdk: &str,
        requests: &[DeriveRequest<'_>],
    ) -> Result<Vec<Result<WrappedKey, KeyServiceError>>, KeyServiceError> {
        let bdk = self.unseal_key(sealed_bdk, SealedKind::Bdk)?;
        let bdk = Bdk::new(&bdk)?;
        if requests.len() < 64 || self.threads == 1 {
            return Ok(self.derive_all(&bdk, requests));
        }
        let chunk = requests.len().div_ceil(self.threads);
        let bdk = &bdk;
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> =
                requests.chunks(chunk).map(|part| scope.spawn(move || self.derive_all(bdk, part))).collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect::<Vec<_>>()
        });
        if results.len() != requests.len() {
            return Err(KeyServiceError::Derivation("a derivation worker failed".into()));
        }
        Ok(results)
    }
}

/// What a key sealed at rest is for: its TR-31 usage and, where it is fixed, mode of use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SealedKind {
    /// A key source: usage `B0`, mode `X` (derivation).
    Bdk,
    /// A key-encryption key: usage `K0`, mode `D` (decrypt and unwrap only).
    Kek,
    /// A device's key-block protection key: usage `K1`.
    Kbpk,
}

impl SealedKind {
    fn usage(self) -> [u8; 2] {
        match self {
            SealedKind::Bdk => *b"B0",
            SealedKind::Kek => *b"K0",
            SealedKind::Kbpk => *b"K1",
        }
    }

    /// The mode of use written at sealing, and required at unsealing where it is `Some`.
    fn mode(self) -> Option<u8> {
        match self {
            SealedKind::Bdk => None,
            SealedKind::Kek => Some(b'D'),
            SealedKind::Kbpk => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SealedKind::Bdk => "BDK (B0)",
            SealedKind::Kek => "key-encryption key (K0/D)",
            SealedKind::Kbpk => "key-block protection key (K1)",
        }
    }
}

impl SoftwareKeyService {
    /// Seals a BDK or a KEK with the header of its kind.
    fn seal_as(&self, kind: SealedKind, key: &SymmetricKey) -> Result<SealedKey, KeyServiceError> {
        let algorithm = if key.algorithm().is_tdes() { b'T' } else { b'A' };
        let mode = kind.mode().unwrap_or(b'X');
        let sealed = self.seal(kind.usage(), algorithm, mode, key)?;
        Ok(SealedKey { sealed, algorithm: key.algorithm(), kcv: key.kcv(KcvLen::Three) })
    }

    fn seal_hmac(&self, key: &SymmetricKey) -> Result<String, KeyServiceError> {
        let header = Header::builder(Version::D, *b"M7", b'H', b'C')
            .exportability(b'N')
            .build()
            .map_err(|e| KeyServiceError::Tr31(e.to_string()))?;
        tr31::wrap(&self.master.0, &header, key.secret(), &mut os_random)
            .map_err(|e| KeyServiceError::Tr31(e.to_string()))
    }
}

impl SoftwareKeyService {
    /// Seals an HMAC key (`M7`) marked by a proprietary optional block, so that it opens only as
    /// the kind of key the block names.
    fn seal_marked_mac_key(&self, key: &MacKey, block: [u8; 2], data: &str) -> Result<String, KeyServiceError> {
        let header = Header::builder(Version::D, *b"M7", b'H', b'C')
            .exportability(b'N')
            .optional_block(tr31::OptionalBlock::new(block, data).map_err(|e| KeyServiceError::Tr31(e.to_string()))?)
            .build()
            .map_err(|e| KeyServiceError::Tr31(e.to_string()))?;
        tr31::wrap(&self.master.0, &header, &SecretBytes::from_slice(key.expose_secret()), &mut os_random)
            .map_err(|e| KeyServiceError::Tr31(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_ksns_are_unique_per_serial_and_have_a_zero_counter() {
        let ksi = [0xFF, 0xFF, 0x98, 0x76, 0x54];
        let a = tdes_initial_ksn(&ksi, 0).expect("ksn");
        let b = tdes_initial_ksn(&ksi, 1).expect("ksn");
        assert_ne!(a, b);
        assert_eq!(a.counter(), 0);
        assert_eq!(b.counter(), 0);
        assert_eq!(a.to_hex(), "FFFF9876540000000000");
        assert_eq!(b.to_hex(), "FFFF9876540000200000");
    }

    #[test]
    fn a_master_key_file_in_the_wrong_format_is_refused_with_the_expected_format() {
        let good = "00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF\n";
        assert!(MasterKey::parse(good.as_bytes()).is_ok());
        let cases: [(&[u8], &str); 4] = [
            (&[0xA5; 32], "32 bytes that are not text"),
            (b"0011\n", "found 4 characters"),
            (b"zz112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF", "62 of them hexadecimal"),
            (b"", "found 0 characters"),
        ];
        for (raw, found) in cases {
            let Err(e) = MasterKey::parse(raw) else { panic!("{found}: accepted") };
            assert!(e.contains("expected 64 hexadecimal digits") && e.contains(found), "{e}");
        }
    }

    /// A GUDID's MAC key is kept only sealed: it opens under the master key it was sealed under,
    /// as a GUDID MAC key only, and the sealed text does not hold the key.
    #[test]
    fn a_gudid_mac_key_opens_only_as_itself_and_only_under_its_master_key() {
        let service = SoftwareKeyService::new(MasterKey::generate().expect("master key"));
        let key = MacKey::new(SecretBytes::from_slice(&[0x5A; 32])).expect("mac key");
        let sealed = service.seal_gudid_mac_key(&key).expect("seal");
        assert!(!sealed.to_uppercase().contains(&"5A".repeat(32)), "the clear key is in the sealed text");
        let opened = service.open_gudid_mac_key(&sealed).expect("open");
        assert_eq!(opened.expose_secret(), key.expose_secret());
        assert!(service.open_signing_key(&sealed).is_err(), "a GUDID MAC key passed for a signing key");
        let secrets = DeviceSecrets {
            signing_key: MacKey::new(SecretBytes::from_slice(&[1; 32])).expect("mac key"),
            kbpk_aes: SymmetricKey::aes(SecretBytes::from_slice(&[2; 32])).expect("aes kbpk"),
            kbpk_tdes: SymmetricKey::tdes(SecretBytes::from_slice(&(1..=24).collect::<Vec<u8>>())).expect("tdes"),
            mqtt_password: SecretBytes::from_slice(&[b'A'; 64]),
        };
        let device = service.seal_device_secrets(&secrets).expect("seal secrets");
        assert!(service.open_gudid_mac_key(&device.signing_key).is_err(), "a signing key passed for a GUDID's");
        assert!(service.open_gudid_mac_key(&device.kbpk_aes).is_err(), "a KBPK passed for a GUDID's");
        let other = SoftwareKeyService::new(MasterKey::generate().expect("master key"));
        assert!(matches!(other.open_gudid_mac_key(&sealed), Err(KeyServiceError::Unseal)));
        // A master key rotation re-seals it like any other key.
        let (old, new) = (MasterKey::generate().expect("old"), MasterKey::generate().expect("new"));
        let sealed_old =
            SoftwareKeyService::new(MasterKey(old.0.clone_secret())).seal_gudid_mac_key(&key).expect("seal");
        let resealed = old.reseal(&sealed_old, &new).expect("reseal");
        let opened = SoftwareKeyService::new(new).open_gudid_mac_key(&resealed).expect("open after rotation");
        assert_eq!(opened.expose_secret(), key.expose_secret());
    }

    #[test]
    fn aes_initial_key_ids_carry_the_bdk_id_and_serial() {
        let id = aes_initial_key_id(&[0x12, 0x34, 0x56, 0x78], 0x90123456).expect("id");
        assert_eq!(id.to_hex(), "1234567890123456");
        assert!(aes_initial_key_id(&[1, 2, 3], 0).is_err());
    }

    /// Both families through the whole batch path (more than 64 requests: the worker threads),
    /// checked against an independent derivation, and a KBPK of the other family refused.
    #[test]
    fn derive_and_wrap_gives_each_device_its_own_key_under_its_own_kbpk() {
        let service = SoftwareKeyService::new(MasterKey::generate().expect("master key"));
        let secrets = DeviceSecrets {
            signing_key: MacKey::new(SecretBytes::from_slice(&[1; 32])).expect("mac key"),
            kbpk_aes: SymmetricKey::aes(SecretBytes::from_slice(&[2; 32])).expect("aes kbpk"),
            kbpk_tdes: SymmetricKey::tdes(SecretBytes::from_slice(&(1..=24).collect::<Vec<u8>>())).expect("tdes kbpk"),
            mqtt_password: SecretBytes::from_slice(&[b'A'; 64]),
        };
        let sealed = service.seal_device_secrets(&secrets).expect("seal secrets");
        let tdes_bdk = SymmetricKey::tdes_from_hex("0123456789ABCDEFFEDCBA9876543210").expect("bdk");
        let aes_bdk = SymmetricKey::aes_from_hex("FEDCBA9876543210F1F1F1F1F1F1F1F1").expect("bdk");
        for (bdk, kbpk, sealed_kbpk, other) in [
            (&tdes_bdk, &secrets.kbpk_tdes, &sealed.kbpk_tdes, &sealed.kbpk_aes),
            (&aes_bdk, &secrets.kbpk_aes, &sealed.kbpk_aes, &sealed.kbpk_tdes),
        ] {
            let sealed_bdk = service.seal_bdk(bdk).expect("seal bdk").sealed;
            let ids: Vec<Vec<u8>> = (0..70u64)
                .map(|serial| match bdk.algorithm().is_tdes() {
                    true => tdes_initial_ksn(&[0xFF, 0xFF, 0x98, 0x76, 0x54], serial).expect("ksn").as_bytes().to_vec(),
                    false => aes_initial_key_id(&[0x12, 0x34, 0x56, 0x78], serial).expect("id").as_bytes().to_vec(),
                })
                .collect();
            let requests: Vec<DeriveRequest<'_>> =
                ids.iter().map(|id| DeriveRequest { key_id: id, sealed_kbpk }).collect();
            let wrapped = service.derive_and_wrap(&sealed_bdk, &requests).expect("batch");
            assert_eq!(wrapped.len(), ids.len());
            for (id, result) in ids.iter().zip(wrapped) {
                let wrapped = result.expect("derived and wrapped");
                assert_eq!(&wrapped.key_id, id);
                let (_, key) = tr31::unwrap(kbpk, &wrapped.key_block).expect("opens under the device's KBPK");
                let expected = if bdk.algorithm().is_tdes() {
                    let ksn = dukpt::tdes::Ksn::from_hex(&hex::encode(id)).expect("ksn");
                    dukpt::tdes::derive_ipek(bdk, &ksn).expect("ipek")
                } else {
                    let initial = dukpt::aes::InitialKeyId::from_hex(&hex::encode(id)).expect("id");
                    dukpt::aes::derive_initial_key(bdk, &initial).expect("initial key")
                };
                assert!(key == *expected.secret(), "the key of {}", hex::encode(id));
                assert_eq!(wrapped.kcv, expected.kcv(KcvLen::Three));
            }
            let wrong = [DeriveRequest { key_id: &ids[0], sealed_kbpk: other }];
            let refused = service.derive_and_wrap(&sealed_bdk, &wrong).expect("batch");
            assert!(matches!(refused[0], Err(KeyServiceError::Key(_))), "{:?}", refused[0]);
            // A stored key ID of the wrong size is refused, not read past.
            let short = [DeriveRequest { key_id: &ids[0][1..], sealed_kbpk }];
            let refused = service.derive_and_wrap(&sealed_bdk, &short).expect("batch");
            assert!(
                matches!(&refused[0], Err(KeyServiceError::Derivation(m)) if m.contains("bytes")),
                "{:?}",
                refused[0]
            );
            // A refused device paired with a good one: each gets its own outcome.
            let mixed = [requests[0], wrong[0], requests[1], requests[2]];
            let outcomes = service.derive_and_wrap(&sealed_bdk, &mixed).expect("batch");
            assert!(matches!(outcomes[1], Err(KeyServiceError::Key(_))), "{:?}", outcomes[1]);
            for (i, id) in [(0, &ids[0]), (2, &ids[1]), (3, &ids[2])] {
                let wrapped = outcomes[i].as_ref().expect("the good devices are wrapped");
                assert_eq!(&wrapped.key_id, id);
                tr31::unwrap(kbpk, &wrapped.key_block).expect("opens under the device's KBPK");
            }
        }
    }

    #[test]
    fn a_backend_mac_key_opens_only_as_itself() {
        let service = SoftwareKeyService::new(MasterKey::generate().expect("master key"));
        let key = MacKey::new(SecretBytes::from_slice(&[0x3C; 32])).expect("mac key");
        let backend = service.seal_backend_mac_key(&key).expect("seal");
        assert!(!backend.to_uppercase().contains(&"3C".repeat(32)), "the clear key is in the sealed text");
        assert_eq!(service.open_backend_mac_key(&backend).expect("open").expose_secret(), key.expose_secret());
        assert!(service.open_gudid_mac_key(&backend).is_err(), "a backend key is not a GUDID key");
        assert!(service.open_signing_key(&backend).is_err(), "a backend key is not a device signing key");
        let gudid = service.seal_gudid_mac_key(&key).expect("seal");
        assert!(service.open_backend_mac_key(&gudid).is_err(), "a GUDID key is not a backend key");
        let other = SoftwareKeyService::new(MasterKey::generate().expect("master key"));
        assert!(other.open_backend_mac_key(&backend).is_err(), "only under its own master key");
    }
}
