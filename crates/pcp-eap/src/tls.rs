//! rustls plumbing shared by peer and authenticator: TLS 1.2 with the ring provider,
//! feeding a whole TLS message in, draining the TLS output and plaintext, and the
//! EAP-TTLS MSK (RFC 5281 §8).

use std::io::Read;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The exporter label of EAP-TTLS keying material (RFC 5281 §8).
pub const TTLS_LABEL: &[u8] = b"ttls keying material";
/// MSK length: the first 64 octets of the keying material.
pub const MSK_LEN: usize = 64;

/// The ring provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.2 only: EAP-TTLS v0 (RFC 5281) defines its keying material over TLS 1.2's PRF.
pub static VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// Feeds a complete TLS message to the connection.
pub fn feed<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    mut data: &[u8],
) -> Result<(), rustls::Error> {
    while !data.is_empty() {
        let n = conn
            .read_tls(&mut data)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if n == 0 {
            break;
        }
        conn.process_new_packets()?;
    }
    Ok(())
}

/// Everything the connection wants to send.
pub fn drain<D>(conn: &mut rustls::ConnectionCommon<D>) -> Vec<u8> {
    let mut out = Vec::new();
    while conn.wants_write() {
        if conn.write_tls(&mut out).is_err() {
            break;
        }
    }
    out
}

/// The plaintext received so far.
pub fn plaintext<D>(conn: &mut rustls::ConnectionCommon<D>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.reader().read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// The EAP-TTLS MSK: PRF(master secret, "ttls keying material", client random ||
/// server random), first 64 octets — the RFC 5705 exporter without context in TLS 1.2.
pub fn msk<D>(conn: &rustls::ConnectionCommon<D>) -> Option<Vec<u8>> {
    if conn.is_handshaking() {
        return None;
    }
    conn.export_keying_material([0u8; MSK_LEN], TTLS_LABEL, None)
        .ok()
        .map(|k| k.to_vec())
}
