//! The server's KT keys: the Ed25519 root-signing key and the VRF key, each 32 random
//! bytes in a file of the data directory (created with mode 0600 on first start).

use std::path::Path;

use akd::ecvrf::{VRFKeyStorage, VrfError};
use ed25519_dalek::SigningKey;
use rand::RngCore as _;
use zeroize::Zeroizing;

use super::KtError;

fn load_or_create_secret(path: &Path) -> Result<Zeroizing<[u8; 32]>, KtError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            let secret: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                KtError::Keys(format!("{} does not hold a 32-byte key", path.display()))
            })?;
            Ok(Zeroizing::new(secret))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = Zeroizing::new([0u8; 32]);
            rand::rngs::OsRng.fill_bytes(secret.as_mut());
            write_private(path, secret.as_ref())?;
            Ok(secret)
        }
        Err(err) => Err(KtError::Keys(format!(
            "cannot read {}: {err}",
            path.display()
        ))),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KtError> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| KtError::Keys(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| KtError::Keys(format!("cannot write {}: {e}", path.display())))
}

pub(super) fn load_or_create_signing_key(path: &Path) -> Result<SigningKey, KtError> {
    let secret = load_or_create_secret(path)?;
    Ok(SigningKey::from_bytes(&secret))
}

/// VRF key storage backed by a key file.
#[derive(Clone)]
pub struct FileVrf {
    secret: Zeroizing<[u8; 32]>,
}

impl FileVrf {
    pub fn load_or_create(path: &Path) -> Result<Self, KtError> {
        Ok(Self {
            secret: load_or_create_secret(path)?,
        })
    }
}

#[async_trait::async_trait]
impl VRFKeyStorage for FileVrf {
    async fn retrieve(&self) -> Result<Vec<u8>, VrfError> {
        Ok(self.secret.to_vec())
    }
}
