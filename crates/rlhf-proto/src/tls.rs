//! Mutual TLS for the run's gRPC channels. At launch the coordinator makes (or reuses) a per-run
//! CA and one leaf certificate for all of the run's processes in `RUN_DIR/tls/` ([`RunTls::create_or_reuse`]);
//! workers read the same files ([`RunTls::load`]), since the run directory is on the filesystem
//! every node shares. Servers then require a client certificate chained to the run's CA
//! ([`RunTls::server`]), and clients present the leaf and trust only that CA ([`RunTls::client`]).
//! The trust model is "whoever can read the run directory's `tls/` is the run": the directory is
//! mode 0700 and its files 0600. The CA's private key is never written: it signs the leaf and is
//! dropped, so nobody, the coordinator included, can issue another certificate of the run.
//! The run token still goes with every call ([`crate::auth`]): a second factor.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The directory under the run directory holding the run's certificates.
pub const DIR_NAME: &str = "tls";
/// Environment variable through which a worker learns the TLS directory (flag `--tls-dir`);
/// unset means plaintext.
pub const TLS_DIR_ENV: &str = "RLHF_TLS_DIR";
/// The run CA's certificate.
pub const CA_FILE: &str = "ca.pem";
/// The leaf certificate every process of the run presents, as server and as client.
pub const CERT_FILE: &str = "run.pem";
/// The leaf's private key.
pub const KEY_FILE: &str = "run.key";
/// The one DNS name in the leaf's subject alternative names. Workers are dialled by IP address
/// or by a host name that varies per node, so clients verify this fixed name instead
/// (`ClientTlsConfig::domain_name`); `.invalid` (RFC 2606) can never be a real host's name.
pub const SERVER_NAME: &str = "rlhf-run.invalid";

/// Why the run's TLS files could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error(
        "{}: mode {mode:04o} lets other users read the run's private key; \
         run `chmod 600 {}` (or delete {} so that the next launch makes new certificates)",
        path.display(), path.display(), path.parent().map(|p| p.display().to_string()).unwrap_or_default()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "{}: {reason}; delete that directory so that the next launch makes new certificates",
        dir.display()
    )]
    Invalid { dir: PathBuf, reason: String },
    #[error("making the run's certificates: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What [`RunTls::create_or_reuse`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// There was no `tls/` directory: new certificates.
    Created,
    /// A valid one from an earlier launch of the run (a resume): kept.
    Reused,
    /// One that could not be used (the reason): replaced by new certificates.
    Replaced(String),
}

/// The run's CA certificate, leaf certificate and leaf key (PEM), checked to belong together.
#[derive(Clone)]
pub struct RunTls {
    dir: PathBuf,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for RunTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunTls")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl RunTls {
    /// The coordinator's side: reuses the certificates in `dir` when they are valid (a resumed
    /// run keeps its CA), else makes new ones. The directory ends up mode 0700, its files 0600.
    pub fn create_or_reuse(dir: &Path, run_name: &str) -> Result<(RunTls, Origin), TlsError> {
        let origin = if dir.exists() {
            match RunTls::load(dir) {
                Ok(tls) => {
                    restrict(dir, 0o700)?;
                    return Ok((tls, Origin::Reused));
                }
                Err(e) => Origin::Replaced(e.to_string()),
            }
        } else {
            Origin::Created
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| TlsError::Io {
                path: dir.to_path_buf(),
                action: "creating the directory",
                source,
            })?;
        // `mode` applies only to a directory it creates.
        restrict(dir, 0o700)?;
        let (ca_pem, cert_pem, key_pem) = generate(run_name)?;
        write_private(&dir.join(CA_FILE), &ca_pem)?;
        write_private(&dir.join(KEY_FILE), &key_pem)?;
        write_private(&dir.join(CERT_FILE), &cert_pem)?;
        let tls = RunTls::load(dir)?;
        Ok((tls, origin))
    }

    /// Reads the certificates in `dir` and checks them the way the peers will: the leaf chains
    /// to the CA, names [`SERVER_NAME`], serves as server and as client, and matches the key;
    /// the key file is readable by its owner only.
    pub fn load(dir: &Path) -> Result<RunTls, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Io {
                path,
                action: "reading the run's TLS file",
                source,
            })
        };
        let ca_pem = read(CA_FILE)?;
        let cert_pem = read(CERT_FILE)?;
        let key_pem = read(KEY_FILE)?;
        let key_path = dir.join(KEY_FILE);
        let mode = std::fs::metadata(&key_path)
            .map_err(|source| TlsError::Io {
                path: key_path.clone(),
                action: "reading the mode of",
                source,
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::Exposed {
                path: key_path,
                mode,
            });
        }
        check(&ca_pem, &cert_pem, &key_pem).map_err(|reason| TlsError::Invalid {
            dir: dir.to_path_buf(),
            reason,
        })?;
        Ok(RunTls {
            dir: dir.to_path_buf(),
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    /// The directory the files came from (handed to the workers).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A server that presents the leaf and requires clients to present a certificate chained to
    /// the run's CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// A client that presents the leaf and trusts only the run's CA, verifying [`SERVER_NAME`]
    /// whatever address it dials. Use with an `https://` endpoint.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(SERVER_NAME)
    }
}

/// The URL scheme of a channel: `https` with TLS, `http` without.
pub fn scheme(tls: bool) -> &'static str {
    if tls {
        "https"
    } else {
        "http"
    }
}

/// Whether a failed connection or call broke on TLS itself (a handshake refused, a certificate
/// not trusted, one side speaking TLS and the other not) rather than on the network: such a
/// failure does not go away by retrying. rustls reports through `std::io::Error`s of kind
/// `InvalidData` whose source is a `rustls::Error`.
pub fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

fn restrict(path: &Path, mode: u32) -> Result<(), TlsError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        TlsError::Io {
            path: path.to_path_buf(),
            action: "setting the mode of",
            source,
        }
    })
}

/// Writes `text` to `path` through a temporary file created mode 0600 (never readable by
/// others, not even for a moment) and a rename, so a crash leaves the old file or the new one.
fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    let io = |action: &'static str| {
        let path = path.to_path_buf();
        move |source| TlsError::Io {
            path,
            action,
            source,
        }
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    // A leftover from a crashed launch may have any mode: start from nothing.
    if let Err(e) = std::fs::remove_file(&tmp) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(io("removing")(e));
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("creating"))?;
    f.write_all(text.as_bytes()).map_err(io("writing"))?;
    f.sync_all().map_err(io("syncing"))?;
    drop(f);
    // The rename replaces any older file (whatever its mode) with this 0600 one.
    std::fs::rename(&tmp, path).map_err(io("renaming the temporary file onto"))
}

/// A new CA (ECDSA P-256) and a leaf signed by it; the CA's key is dropped here.
fn generate(run_name: &str) -> Result<(String, String, String), rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("rlhf-coord run CA ({run_name})"),
    );
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, format!("rlhf-coord run ({run_name})"));
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every process both serves and calls: the coordinator serves workers' registrations and
    // calls workers; workers serve the coordinator and call it.
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.use_authority_key_identifier_extension = true;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}

/// The checks a peer makes, run once up front so that a damaged or mismatched file is reported
/// by name instead of as a refused handshake.
fn check(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<(), String> {
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| format!("{CA_FILE} holds no PEM certificate ({e})"))?;
    let leaf = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("{CERT_FILE} holds no PEM certificate ({e})"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("{KEY_FILE} holds no PEM private key ({e})"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca)
        .map_err(|e| format!("{CA_FILE} is not a usable CA certificate ({e})"))?;
    let roots = Arc::new(roots);
    let now = UnixTime::now();
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| e.to_string())?;
    rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| e.to_string())?
        .verify_server_cert(&leaf, &[], &name, &[], now)
        .map_err(|e| format!("{CERT_FILE} does not verify as a server of {CA_FILE} ({e})"))?;
    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| e.to_string())?
        .verify_client_cert(&leaf, &[], now)
        .map_err(|e| format!("{CERT_FILE} does not verify as a client of {CA_FILE} ({e})"))?;
    rustls::sign::CertifiedKey::from_der(vec![leaf], key, &provider)
        .map_err(|e| format!("{KEY_FILE} is not the key of {CERT_FILE} ({e})"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_are_private_and_reused_when_valid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run").join(DIR_NAME);
        let (a, origin) = RunTls::create_or_reuse(&dir, "t").unwrap();
        assert_eq!(origin, Origin::Created);
        assert_eq!(mode(&dir), 0o700);
        for f in [CA_FILE, CERT_FILE, KEY_FILE] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        let (b, origin) = RunTls::create_or_reuse(&dir, "t").unwrap();
        assert_eq!(origin, Origin::Reused);
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(a.key_pem, b.key_pem);
        // A loosened directory is tightened again on reuse.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        RunTls::create_or_reuse(&dir, "t").unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn damaged_mismatched_or_exposed_files_are_named_and_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let (d1, d2) = (tmp.path().join("a"), tmp.path().join("b"));
        let (one, _) = RunTls::create_or_reuse(&d1, "a").unwrap();
        RunTls::create_or_reuse(&d2, "b").unwrap();

        // A leaf of another CA.
        std::fs::copy(d2.join(CERT_FILE), d1.join(CERT_FILE)).unwrap();
        let e = RunTls::load(&d1).unwrap_err().to_string();
        assert!(
            e.contains("run.pem does not verify as a server of ca.pem"),
            "{e}"
        );
        assert!(e.contains("delete that directory"), "{e}");
        let (new, origin) = RunTls::create_or_reuse(&d1, "a").unwrap();
        assert!(
            matches!(&origin, Origin::Replaced(r) if r.contains("run.pem")),
            "{origin:?}"
        );
        assert_ne!(new.ca_pem, one.ca_pem);

        // Another run's key beside this run's leaf.
        std::fs::copy(d2.join(KEY_FILE), d1.join(KEY_FILE)).unwrap();
        let e = RunTls::load(&d1).unwrap_err().to_string();
        assert!(e.contains("run.key is not the key of run.pem"), "{e}");

        // Garbage.
        RunTls::create_or_reuse(&d1, "a").unwrap();
        std::fs::write(d1.join(CA_FILE), "nothing").unwrap();
        let e = RunTls::load(&d1).unwrap_err().to_string();
        assert!(e.contains("ca.pem holds no PEM certificate"), "{e}");

        // A key readable by others is refused by name, with what to do.
        RunTls::create_or_reuse(&d1, "a").unwrap();
        std::fs::set_permissions(d1.join(KEY_FILE), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let e = RunTls::load(&d1).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        // The coordinator replaces such a key rather than keep one others may have read.
        let (_, origin) = RunTls::create_or_reuse(&d1, "a").unwrap();
        assert!(matches!(origin, Origin::Replaced(_)), "{origin:?}");
        assert_eq!(mode(&d1.join(KEY_FILE)), 0o600);

        // Missing files.
        let e = RunTls::load(&tmp.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca.pem: reading the run's TLS file"), "{e}");
    }
}
