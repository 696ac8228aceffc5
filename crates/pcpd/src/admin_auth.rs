//! Who may use the admin API.
//!
//! Two bearer tokens, each read from a file (never from the command line, where `ps`
//! shows it): `admin_token_file` allows everything, `admin_read_token_file` only the
//! read-only endpoints (`GET`). On a loopback address the API may run without tokens
//! (the embedded default); bound anywhere else, pcpd refuses to start without
//! `admin_token_file`. A token file readable by "other" is refused as well.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Why the admin API's tokens cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Bound beyond loopback without a token.
    #[error(
        "the admin API on {0} is reachable beyond this host: set [pcpd] admin_token_file (a file holding the bearer token), or bind it to a loopback address"
    )]
    TokenRequired(SocketAddr),
    /// A token file could not be read.
    #[error("{key} {path}: {source}")]
    Read {
        /// Which key named it.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A token file is unusable.
    #[error("{key} {path}: {problem}")]
    Bad {
        /// Which key named it.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },
}

/// The tokens in force.
#[derive(Clone, Default)]
pub struct Auth {
    admin: Option<Vec<u8>>,
    read: Option<Vec<u8>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("Auth")
            .field("admin", &self.admin.is_some())
            .field("read", &self.read.is_some())
            .finish()
    }
}

/// Reads a token file: the first line, trimmed; at least 16 octets.
fn read_token(key: &'static str, path: &Path) -> Result<Vec<u8>, AuthError> {
    let bad = |problem| AuthError::Bad {
        key,
        path: path.to_path_buf(),
        problem,
    };
    let read = |source| AuthError::Read {
        key,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o007 != 0 {
            return Err(bad(
                "is accessible to every user (chmod o-rwx, e.g. 0600 or 0640)",
            ));
        }
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.len() < 16 {
        return Err(bad("holds no token of at least 16 characters"));
    }
    Ok(token.as_bytes().to_vec())
}

impl Auth {
    /// Loads the tokens for an API bound to `addr`.
    pub fn load(
        addr: SocketAddr,
        admin_token_file: Option<&Path>,
        read_token_file: Option<&Path>,
    ) -> Result<Auth, AuthError> {
        let admin = admin_token_file
            .map(|p| read_token("admin_token_file", p))
            .transpose()?;
        let read = read_token_file
            .map(|p| read_token("admin_read_token_file", p))
            .transpose()?;
        if admin.is_none() && !addr.ip().is_loopback() {
            return Err(AuthError::TokenRequired(addr));
        }
        if admin.is_none() && read.is_some() {
            // A read token alone would leave the mutating endpoints open.
            return Err(AuthError::Bad {
                key: "admin_read_token_file",
                path: read_token_file.map(Path::to_path_buf).unwrap_or_default(),
                problem: "needs admin_token_file too (or the mutating endpoints stay open)",
            });
        }
        Ok(Auth { admin, read })
    }

    /// Whether any token is required.
    pub fn required(&self) -> bool {
        self.admin.is_some()
    }

    /// Whether a request with `presented` may use `method`.
    fn allows(&self, method: &Method, presented: Option<&[u8]>) -> bool {
        let Some(admin) = &self.admin else {
            return true;
        };
        let Some(p) = presented else {
            return false;
        };
        if ct_eq(p, admin) {
            return true;
        }
        let read_only = matches!(*method, Method::GET | Method::HEAD);
        read_only && self.read.as_deref().is_some_and(|r| ct_eq(p, r))
    }
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The axum middleware: 401 without a valid token, 403 with a read-only token on a
/// mutating endpoint.
pub async fn check(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    if !auth.required() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .map(<[u8]>::trim_ascii);
    if auth.allows(req.method(), presented) {
        return next.run(req).await;
    }
    let read_token_ok =
        presented.is_some_and(|p| auth.read.as_deref().is_some_and(|r| ct_eq(p, r)));
    if read_token_ok {
        (
            StatusCode::FORBIDDEN,
            "this token is read-only; the endpoint needs the admin token\n",
        )
            .into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required (Authorization: Bearer <token>)\n",
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("pcpd-auth-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn beyond_loopback_needs_a_token() {
        let lo: SocketAddr = "127.0.0.1:8351".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8351".parse().unwrap();
        assert!(!Auth::load(lo, None, None).unwrap().required());
        assert!(matches!(
            Auth::load(any, None, None),
            Err(AuthError::TokenRequired(_))
        ));
        let d = dir();
        let t = file(&d, "a", "0123456789abcdef-admin\n", 0o600);
        assert!(Auth::load(any, Some(&t), None).unwrap().required());
    }

    #[test]
    fn bad_token_files_are_refused() {
        let d = dir();
        let lo: SocketAddr = "127.0.0.1:8351".parse().unwrap();
        let open = file(&d, "open", "0123456789abcdef-admin\n", 0o644);
        let short = file(&d, "short", "secret\n", 0o600);
        let good = file(&d, "good", "0123456789abcdef-admin\n", 0o640);
        assert!(Auth::load(lo, Some(&open), None).is_err());
        assert!(Auth::load(lo, Some(&short), None).is_err());
        assert!(Auth::load(lo, Some(&d.join("missing")), None).is_err());
        assert!(
            Auth::load(lo, None, Some(&good)).is_err(),
            "read token alone"
        );
    }

    #[test]
    fn read_token_reads_admin_token_writes() {
        let d = dir();
        let lo: SocketAddr = "127.0.0.1:8351".parse().unwrap();
        let a = file(&d, "adm", "0123456789abcdef-admin\n", 0o600);
        let r = file(&d, "rd", "0123456789abcdef-read\n", 0o600);
        let auth = Auth::load(lo, Some(&a), Some(&r)).unwrap();
        let admin = Some(&b"0123456789abcdef-admin"[..]);
        let read = Some(&b"0123456789abcdef-read"[..]);
        assert!(auth.allows(&Method::GET, admin));
        assert!(auth.allows(&Method::POST, admin));
        assert!(auth.allows(&Method::GET, read));
        assert!(!auth.allows(&Method::POST, read));
        assert!(!auth.allows(&Method::GET, None));
        assert!(!auth.allows(&Method::GET, Some(b"0123456789abcdef-admiN")));
        assert!(
            !format!("{auth:?}").contains("0123"),
            "Debug shows no token"
        );
    }
}
