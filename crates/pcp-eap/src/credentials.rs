//! The embedded back end's credentials file: one `name:hash` per line, the hash an
//! Argon2 PHC string (`$argon2id$v=19$...`); `#` starts a comment line. Passwords are
//! never stored in clear; [`hash_password`] makes the hash.

use std::collections::HashMap;
use std::path::Path;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

/// A credentials file that cannot be used, with where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct CredentialsError {
    /// The file.
    pub file: String,
    /// Line number (1-based; 0 when the file cannot be read).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// Users and their password hashes.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    users: HashMap<String, String>,
}

/// A hash of no one's password, checked for unknown users so that the time taken does
/// not tell which names exist.
fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password(b"pcp-auth: no such user").unwrap_or_default())
}

/// The Argon2id PHC string of `password` with a random salt.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    Argon2::default()
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

impl Credentials {
    /// Parses the text of a credentials file named `file` (for error messages).
    pub fn parse(text: &str, file: &str) -> Result<Credentials, CredentialsError> {
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason: String| CredentialsError {
                file: file.to_string(),
                line: i + 1,
                reason,
            };
            let (name, hash) = line
                .split_once(':')
                .ok_or_else(|| err("expected name:argon2-hash".into()))?;
            if name.is_empty() {
                return Err(err("empty user name".into()));
            }
            PasswordHash::new(hash).map_err(|e| err(format!("user {name}: bad hash: {e}")))?;
            if users.insert(name.to_string(), hash.to_string()).is_some() {
                return Err(err(format!("user {name} appears twice")));
            }
        }
        Ok(Credentials { users })
    }

    /// Reads and parses a credentials file.
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| CredentialsError {
            file: file.clone(),
            line: 0,
            reason: e.to_string(),
        })?;
        Credentials::parse(&text, &file)
    }

    /// Whether `password` is `user`'s.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.as_str(), true),
            None => (dummy_hash(), false),
        };
        let ok = PasswordHash::new(hash)
            .is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok());
        ok && known
    }

    /// Whether `user` is listed (a reload ends the sessions of users no longer listed).
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_and_file_errors_name_the_line() {
        let h = hash_password(b"s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        let c = Credentials::parse(&format!("# users\n\nalice:{h}\n"), "creds").unwrap();
        assert!(c.verify("alice", b"s3cret"));
        assert!(!c.verify("alice", b"s3cret "));
        assert!(!c.verify("bob", b"s3cret"));
        let e = Credentials::parse("alice:plaintext\n", "creds").unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("creds", 1));
        let e = Credentials::parse(&format!("a:{h}\n\nno-colon\n"), "f").unwrap_err();
        assert_eq!(e.line, 3);
        let e = Credentials::parse(&format!("a:{h}\na:{h}\n"), "f").unwrap_err();
        assert!(e.reason.contains("twice"));
    }
}
