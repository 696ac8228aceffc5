//! Known-answer tests of the key derivation and the tags, checked against an independent
//! computation: Python's `hmac` module, run by the test when `python3` is there (CI has
//! it: Debian), and the values it gave, written down here, when it is not. RFC 4231 test
//! case 2 checks the HMAC-SHA-256 underneath.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use pcp_auth::TransportKey;
use pcp_auth::crypto::MAC_LEN;
use pcp_auth::tag;
use pcp_proto::{Body, MapBody, Options, Request, ResultCode};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `script` with python3 and returns its stdout trimmed, or `None` (with a loud
/// SKIP) when python3 is not installed.
fn python(script: &str) -> Option<String> {
    match Command::new("python3").arg("-c").arg(script).output() {
        Ok(out) if out.status.success() => {
            Some(String::from_utf8(out.stdout).unwrap().trim().to_string())
        }
        Ok(out) => panic!("python3 failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(_) => {
            eprintln!("SKIP: python3 not found; checking the recorded Python answers only");
            None
        }
    }
}

const MSK: [u8; 64] = {
    let mut m = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        m[i] = i as u8;
        i += 1;
    }
    m
};

/// transport key = HMAC-SHA-256(MSK, "IETF PCP" || Session ID || Nonce || Key ID), the
/// three numbers as 4 octets in network byte order (docs/AUTH.md).
const TRANSPORT_KEY: &str = "053d724297ae9959b84918ca7bdb14ba784bc68c5fe83ff98370de33eecf2b71";

#[test]
fn hmac_sha256_is_rfc4231() {
    // RFC 4231 §4.3 (test case 2), truncated to 128 bits as AUTH_HMAC_SHA2_256_128.
    let k = b"Jefe";
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(k);
    // A 4-octet key is zero-padded to the block size by HMAC, like our 32-octet key
    // with 28 zero octets: the same MAC.
    let mac = TransportKey::from_bytes(0, key).mac(&[b"what do ya want ", b"for nothing?"]);
    assert_eq!(hex(&mac), "5bdcc146bf60754e6a042426089575c7");
}

#[test]
fn transport_key_matches_python() {
    let key = TransportKey::derive(&MSK, 0xdead_beef, 0x0102_0304, 1);
    assert_eq!(hex(key.as_bytes()), TRANSPORT_KEY);
    assert_eq!(key.id, 1);
    if let Some(py) = python(
        "import hmac,hashlib,struct
msk=bytes(range(64))
print(hmac.new(msk,b'IETF PCP'+struct.pack('>III',0xdeadbeef,0x01020304,1),hashlib.sha256).hexdigest())",
    ) {
        assert_eq!(py, TRANSPORT_KEY);
    }
    // Every input matters.
    for other in [
        TransportKey::derive(&MSK[..63], 0xdead_beef, 0x0102_0304, 1),
        TransportKey::derive(&MSK, 0xdead_beee, 0x0102_0304, 1),
        TransportKey::derive(&MSK, 0xdead_beef, 0x0102_0305, 1),
        TransportKey::derive(&MSK, 0xdead_beef, 0x0102_0304, 2),
    ] {
        assert_ne!(hex(other.as_bytes()), TRANSPORT_KEY);
    }
}

#[test]
fn common_message_tag_matches_python() {
    let key = TransportKey::derive(&MSK, 0xdead_beef, 0x0102_0304, 1);
    let req = Request {
        lifetime: 3600,
        client_addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        body: Body::Map(MapBody {
            nonce: [7; 12],
            protocol: 17,
            internal_port: 5060,
            external_port: 0,
            external_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }),
        options: Options::EMPTY,
        pa_result_code: ResultCode::Success,
    };
    let mut buf = [0u8; 1100];
    let n = req.emit(&mut buf).unwrap();
    let n = tag::seal(&mut buf, n, &key, (0xdead_beef, 42)).unwrap();
    let msg = &buf[..n];
    assert_eq!(n, 60 + 4 + 28);
    // The tag option as RFC 7652 §5.4 lays it out.
    assert_eq!(hex(&msg[60..76]), "0500001cdeadbeef0000002a00000001");
    let mac = &msg[n - MAC_LEN..];
    // Python's answer for this message, recorded; the live run above recomputes it.
    const WANT: &str = "6bfe906ccc3e3507b5f836301e9dce57";
    let script = format!(
        "import hmac,hashlib
m=bytearray.fromhex('{}')
m[-16:]=bytes(16)
print(hmac.new(bytes.fromhex('{TRANSPORT_KEY}'),bytes(m),hashlib.sha256).hexdigest()[:32])",
        hex(msg)
    );
    if let Some(py) = python(&script) {
        assert_eq!(py, hex(mac));
    }
    assert_eq!(hex(mac), WANT);
    assert!(tag::verify(msg, &key).is_ok());
}
