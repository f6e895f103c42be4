//! `rkictl key …`: the operator's offline key calculator. Every computation is `rki-protocol`'s;
//! this file only parses arguments and shapes the answer. It reads no store and opens no socket.
//!
//! Secrets arrive as arguments (or their `RKICTL_…` environment variables, which keep them out of
//! the shell history) and leave as hex on standard output: that is the tool's purpose.

use clap::{Subcommand, ValueEnum};
use serde_json::{json, Map, Value};

use crate::Output;

use rki_protocol::dukpt::{self, InitialKeyId, Ksn};
use rki_protocol::tr31::{self, Header, Version};
use rki_protocol::{Kcv, KcvLen, SecretBytes, SymmetricKey};

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// TDES DUKPT IPEK (ANSI X9.24-1-2009) from a BDK and a KSN.
    Ipek {
        /// BDK, 32 or 48 hex digits (two- or three-key TDES).
        #[arg(long, value_name = "HEX", env = "RKICTL_BDK", hide_env_values = true)]
        bdk: String,
        /// Key serial number, 20 hex digits; its counter is ignored.
        #[arg(long, value_name = "HEX")]
        ksn: String,
    },
    /// AES DUKPT initial key (ANSI X9.24-3-2017); its type follows the BDK's length.
    AesInitialKey {
        /// BDK, 32, 48 or 64 hex digits (AES-128, -192 or -256).
        #[arg(long, value_name = "HEX", env = "RKICTL_BDK", hide_env_values = true)]
        bdk: String,
        /// Initial key ID, 16 hex digits.
        #[arg(long, value_name = "HEX")]
        initial_key_id: String,
    },
    /// Key check value: TDES-ECB of zeros, or AES-CMAC of zeros.
    Kcv {
        #[arg(long, value_name = "HEX", env = "RKICTL_KEY", hide_env_values = true)]
        key: String,
        #[arg(long, value_enum)]
        alg: KcvAlgorithm,
        /// Bytes of check value.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=5))]
        len: u8,
    },
    /// Wraps a key in a TR-31 key block (version B under a TDES KBPK, D under an AES KBPK).
    Tr31Wrap {
        /// Key block protection key: TDES for version B, AES for version D.
        #[arg(long, value_name = "HEX", env = "RKICTL_KBPK", hide_env_values = true)]
        kbpk: String,
        /// The header, e.g. D0000B1AX00E0000, optional blocks may follow; the length digits
        /// are computed.
        #[arg(long, value_name = "STR")]
        header: String,
        /// The key to wrap.
        #[arg(long, value_name = "HEX", env = "RKICTL_KEY", hide_env_values = true)]
        key: String,
    },
    /// Unwraps a TR-31 key block of any version (A, B, C, D).
    Tr31Unwrap {
        #[arg(long, value_name = "HEX", env = "RKICTL_KBPK", hide_env_values = true)]
        kbpk: String,
        #[arg(long, value_name = "STR")]
        key_block: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KcvAlgorithm {
    Tdes,
    Aes,
}

/// Runs one `key` command: the fields to print, or a one-line reason.
pub fn run(command: KeyCommand) -> Result<Output, String> {
    match command {
        KeyCommand::Ipek { bdk, ksn } => ipek(&bdk, &ksn),
        KeyCommand::AesInitialKey { bdk, initial_key_id } => aes_initial_key(&bdk, &initial_key_id),
        KeyCommand::Kcv { key, alg, len } => kcv(&key, alg, len),
        KeyCommand::Tr31Wrap { kbpk, header, key } => tr31_wrap(&kbpk, &header, &key),
        KeyCommand::Tr31Unwrap { kbpk, key_block } => tr31_unwrap(&kbpk, &key_block),
    }
}

fn ipek(bdk: &str, ksn: &str) -> Result<Output, String> {
    let bdk = tdes_key("--bdk", bdk)?;
    let ksn = Ksn::from_hex(ksn).map_err(|e| format!("--ksn: {e}"))?;
    let ipek = dukpt::derive_ipek(&bdk, &ksn).map_err(|e| e.to_string())?;
    Ok(vec![("ipek", json!(ipek.secret().to_hex_upper().as_str())), ("kcv", json!(ipek.kcv(KcvLen::Three).to_hex()))])
}

fn aes_initial_key(bdk: &str, id: &str) -> Result<Output, String> {
    let bdk = aes_key("--bdk", bdk)?;
    let id = InitialKeyId::from_hex(id).map_err(|e| format!("--initial-key-id: {e}"))?;
    let key = dukpt::derive_initial_key(&bdk, &id).map_err(|e| e.to_string())?;
    Ok(vec![
        ("initial_key", json!(key.secret().to_hex_upper().as_str())),
        ("kcv", json!(key.kcv(KcvLen::Three).to_hex())),
    ])
}

fn kcv(key: &str, algorithm: KcvAlgorithm, len: u8) -> Result<Output, String> {
    let key = match algorithm {
        KcvAlgorithm::Tdes => tdes_key("--key", key)?,
        KcvAlgorithm::Aes => aes_key("--key", key)?,
    };
    let len = KcvLen::from_bytes(usize::from(len)).ok_or_else(|| format!("--len: a KCV is 3 or 5 bytes, not {len}"))?;
    Ok(vec![("kcv", json!(key.kcv(len).to_hex()))])
}

fn tr31_wrap(kbpk: &str, header: &str, key: &str) -> Result<Output, String> {
    let header = Header::parse(header).map_err(|e| format!("--header: {e}"))?;
    let kbpk = kbpk_for(header.version(), kbpk)?;
    let key = secret("--key", key)?;
    // Padding comes from the OS CSPRNG; a failure there must not leave zero padding unnoticed.
    let mut rng_failed = false;
    let mut rng = |buf: &mut [u8]| match SecretBytes::random(buf.len()) {
        Ok(random) => buf.copy_from_slice(random.expose_secret()),
        Err(_) => rng_failed = true,
    };
    let block = tr31::wrap(&kbpk, &header, &key, &mut rng).map_err(|e| e.to_string())?;
    if rng_failed {
        return Err("the operating system's random number generator failed".into());
    }
    Ok(vec![("key_block", json!(block))])
}

fn tr31_unwrap(kbpk: &str, block: &str) -> Result<Output, String> {
    let version = block
        .bytes()
        .next()
        .and_then(Version::from_byte)
        .ok_or("--key-block: does not start with a key block version (A, B, C or D)")?;
    let kbpk = kbpk_for(version, kbpk)?;
    let (header, key) = tr31::unwrap(&kbpk, block).map_err(|e| e.to_string())?;
    let kcv = check_value(header.algorithm(), &key);
    if let (Some(computed), Some(declared)) = (kcv, declared_kcv(&header)) {
        let shown = Kcv::from_slice(&computed.as_bytes()[..declared.as_bytes().len()]);
        if shown != Some(declared) {
            return Err(format!("the KC block says KCV {declared} but the unwrapped key's is {computed}"));
        }
    }
    Ok(vec![
        ("key", json!(key.to_hex_upper().as_str())),
        ("header", header_fields(&header)),
        ("kcv", json!(kcv.map(|k| k.short().to_hex()))),
    ])
}

fn header_fields(header: &Header) -> Value {
    let text = |byte: u8| char::from(byte).to_string();
    let mut blocks = Map::new();
    for block in header.optional_blocks() {
        blocks.insert(block.id_str().to_owned(), Value::from(block.data()));
    }
    json!({
        "version": header.version().to_string(),
        "key_usage": header.key_usage_str(),
        "algorithm": text(header.algorithm()),
        "mode_of_use": text(header.mode_of_use()),
        "key_version_number": String::from_utf8_lossy(&header.key_version_number()),
        "exportability": text(header.exportability()),
        "optional_blocks": blocks,
    })
}

/// The check value of an unwrapped key when its algorithm has one we compute: TDES (single
/// length as K1K1), DES as K1K1, AES by CMAC.
fn check_value(algorithm: u8, key: &SecretBytes) -> Option<Kcv> {
    let typed = match (algorithm, key.len()) {
        (b'T' | b'D', 8) => {
            let mut doubled = SecretBytes::zeroed(16);
            doubled.expose_secret_mut()[..8].copy_from_slice(key.expose_secret());
            doubled.expose_secret_mut()[8..].copy_from_slice(key.expose_secret());
            SymmetricKey::tdes(doubled).ok()?
        }
        (b'T', _) => SymmetricKey::tdes(key.clone_secret()).ok()?,
        (b'A', _) => SymmetricKey::aes(key.clone_secret()).ok()?,
        _ => return None,
    };
    Some(typed.kcv(KcvLen::Five))
}

/// The `KC` block's KCV when it uses the method we compute for the key's algorithm (`00`,
/// encrypted zeros, for TDES; `01`, CMAC, for AES).
fn declared_kcv(header: &Header) -> Option<Kcv> {
    let data = header.optional_block(*b"KC")?;
    let method = match header.algorithm() {
        b'T' | b'D' => "00",
        b'A' => "01",
        _ => return None,
    };
    if !data.starts_with(method) {
        return None;
    }
    header.kcv()
}

fn kbpk_for(version: Version, hex: &str) -> Result<SymmetricKey, String> {
    match version {
        Version::A | Version::B | Version::C => tdes_key("--kbpk", hex),
        Version::D => aes_key("--kbpk", hex),
    }
}

fn secret(flag: &str, hex: &str) -> Result<SecretBytes, String> {
    SecretBytes::from_hex(hex.trim()).map_err(|e| match e {
        hex::FromHexError::OddLength => format!("{flag}: odd number of hex digits"),
        hex::FromHexError::InvalidHexCharacter { c, index } => {
            format!("{flag}: {c:?} at position {index} is not a hex digit")
        }
        hex::FromHexError::InvalidStringLength => format!("{flag}: wrong length"),
    })
}

fn tdes_key(flag: &str, hex: &str) -> Result<SymmetricKey, String> {
    SymmetricKey::tdes(secret(flag, hex)?).map_err(|e| format!("{flag}: {e}"))
}

fn aes_key(flag: &str, hex: &str) -> Result<SymmetricKey, String> {
    SymmetricKey::aes(secret(flag, hex)?).map_err(|e| format!("{flag}: {e}"))
}
