//! Codec invariants for fuzzing (cargo feature `fuzzing`).
//!
//! [`check_invariants`] is the single body of the `parse` fuzz target
//! (`crates/pcp-proto/fuzz/fuzz_targets/parse.rs`) and of the regression test that
//! replays the committed corpus (`crates/pcp-proto/tests/fuzz_corpus.rs`), so both check
//! exactly the same properties. A violated invariant panics.

use crate::{
    Extensions, HEADER_LEN, MAX_MESSAGE_LEN, OptionCode, PcpOption, Request, Response, ResultCode,
    VERSION, natpmp,
};

/// Size of the output buffer every emit is given: the PCP maximum message length.
pub const EMIT_BUF_LEN: usize = MAX_MESSAGE_LEN;

/// Feeds `data` to every parser of the crate, to
/// [`emit_error_response`](crate::emit_error_response) and to
/// [`remove_option`](crate::remove_option), and panics if an invariant does not hold:
///
/// - no parser, emitter or accessor panics, whatever the input;
/// - a request that parses without RFC 7652 support ([`Extensions::BASE`]) parses to
///   the same value with it;
/// - whenever a parse succeeds, emitting the value into a
///   [`EMIT_BUF_LEN`]-octet buffer succeeds, writes at most `data.len()` octets (no
///   growth), re-parsing the emitted octets gives an equal value
///   (`parse(emit(x)) == x`), and emitting that value again gives the same octets;
/// - an error response built from any input is a well-formed PCP response header of
///   24..=1100 octets, a multiple of 4, with the request's opcode, and, for a request
///   that parses, it parses as a response carrying the same opcode body and options;
/// - removing an option (CHECKPOINT_REQUIRED for the seeds: the code is 192 XOR the
///   header's reserved octet) never lengthens the message nor touches header and body,
///   and from a message that parses it gives one that still parses, equal but for the
///   removed options.
pub fn check_invariants(data: &[u8]) {
    pcp_request(data);
    pcp_response(data);
    natpmp_request(data);
    natpmp_response(data);
    error_response(data, true);
    error_response(data, false);
    remove_option(data);
}

fn pcp_request(data: &[u8]) {
    let base = Request::parse_with(data, Extensions::BASE);
    let Ok(req) = Request::parse(data) else {
        assert!(
            base.is_err(),
            "a request parses without RFC 7652 but not with it"
        );
        return;
    };
    if let Ok(base) = base {
        assert_eq!(
            base, req,
            "RFC 7652 support changed a request that parses without it"
        );
    }
    // Accessors over the validated option area must not panic either.
    let _ = (req.options.len(), req.options.description(), req.opcode());
    let mut buf = [0u8; EMIT_BUF_LEN];
    let n = req
        .emit(&mut buf)
        .unwrap_or_else(|e| panic!("parsed PCP request does not emit: {e}; {req:?}"));
    assert_eq!(
        n,
        req.buffer_len(),
        "PCP request: emit length != buffer_len"
    );
    assert!(
        n <= data.len(),
        "PCP request grew from {} to {n} octets",
        data.len()
    );
    let back = Request::parse(&buf[..n])
        .unwrap_or_else(|e| panic!("emitted PCP request does not parse: {e}; {req:?}"));
    assert_eq!(back, req, "PCP request: parse(emit(x)) != x");
    let mut again = [0u8; EMIT_BUF_LEN];
    let m = back.emit(&mut again).expect("re-emit of PCP request");
    assert_eq!(&again[..m], &buf[..n], "PCP request: emit is not canonical");
}

fn pcp_response(data: &[u8]) {
    let Ok(resp) = Response::parse(data) else {
        return;
    };
    let _ = (
        resp.options.len(),
        resp.options.description(),
        resp.opcode(),
    );
    let mut buf = [0u8; EMIT_BUF_LEN];
    let n = resp
        .emit(&mut buf)
        .unwrap_or_else(|e| panic!("parsed PCP response does not emit: {e}; {resp:?}"));
    assert_eq!(
        n,
        resp.buffer_len(),
        "PCP response: emit length != buffer_len"
    );
    assert!(
        n <= data.len(),
        "PCP response grew from {} to {n} octets",
        data.len()
    );
    let back = Response::parse(&buf[..n])
        .unwrap_or_else(|e| panic!("emitted PCP response does not parse: {e}; {resp:?}"));
    assert_eq!(back, resp, "PCP response: parse(emit(x)) != x");
    let mut again = [0u8; EMIT_BUF_LEN];
    let m = back.emit(&mut again).expect("re-emit of PCP response");
    assert_eq!(
        &again[..m],
        &buf[..n],
        "PCP response: emit is not canonical"
    );
}

fn natpmp_request(data: &[u8]) {
    let Ok(req) = natpmp::Request::parse(data) else {
        return;
    };
    let mut buf = [0u8; EMIT_BUF_LEN];
    let n = req
        .emit(&mut buf)
        .unwrap_or_else(|| panic!("parsed NAT-PMP request does not emit: {req:?}"));
    assert_eq!(
        n,
        req.buffer_len(),
        "NAT-PMP request: emit length != buffer_len"
    );
    assert!(
        n <= data.len(),
        "NAT-PMP request grew from {} to {n} octets",
        data.len()
    );
    let back = natpmp::Request::parse(&buf[..n])
        .unwrap_or_else(|e| panic!("emitted NAT-PMP request does not parse: {e}; {req:?}"));
    assert_eq!(back, req, "NAT-PMP request: parse(emit(x)) != x");
}

fn natpmp_response(data: &[u8]) {
    let Ok(resp) = natpmp::Response::parse(data) else {
        return;
    };
    let mut buf = [0u8; EMIT_BUF_LEN];
    let n = resp
        .emit(&mut buf)
        .unwrap_or_else(|| panic!("parsed NAT-PMP response does not emit: {resp:?}"));
    assert_eq!(
        n,
        resp.buffer_len(),
        "NAT-PMP response: emit length != buffer_len"
    );
    assert!(
        n <= data.len(),
        "NAT-PMP response grew from {} to {n} octets",
        data.len()
    );
    let back = natpmp::Response::parse(&buf[..n])
        .unwrap_or_else(|e| panic!("emitted NAT-PMP response does not parse: {e}; {resp:?}"));
    assert_eq!(back, resp, "NAT-PMP response: parse(emit(x)) != x");
}

/// Result code, lifetime and epoch of the error response, derived from the input so
/// the fuzzer explores them too.
fn error_params(data: &[u8]) -> (ResultCode, u32, u32) {
    let result = ResultCode::from(data.last().copied().unwrap_or(3));
    let lifetime = 1800 + u32::from(data.first().copied().unwrap_or(0));
    (result, lifetime, 0x0102_0304)
}

fn error_response(data: &[u8], parsed: bool) {
    let (result, lifetime, epoch) = error_params(data);
    let mut out = [0u8; EMIT_BUF_LEN];
    let n = crate::emit_error_response(data, result, lifetime, epoch, parsed, &mut out)
        .unwrap_or_else(|e| panic!("error response does not fit {EMIT_BUF_LEN} octets: {e}"));
    assert!(
        (HEADER_LEN..=MAX_MESSAGE_LEN).contains(&n) && n.is_multiple_of(4),
        "error response length {n} is not 24..=1100 and a multiple of 4"
    );
    let resp = &out[..n];
    assert_eq!(resp[0], VERSION, "error response: version");
    assert_eq!(
        resp[1],
        0x80 | (data.get(1).copied().unwrap_or(0) & 0x7f),
        "error response: R bit and opcode"
    );
    assert_eq!(resp[2], 0, "error response: reserved octet");
    assert_eq!(resp[3], result.to_u8(), "error response: result code");
    assert_eq!(
        resp[4..8],
        lifetime.to_be_bytes(),
        "error response: lifetime"
    );
    assert_eq!(resp[8..12], epoch.to_be_bytes(), "error response: epoch");

    // An answer to a request that parsed (and was then refused) must let the client
    // match it: same opcode body, same options.
    if !parsed {
        return;
    }
    let Ok(req) = Request::parse(data) else {
        return;
    };
    let back = Response::parse(resp).unwrap_or_else(|e| {
        panic!("error response to a parsed request does not parse: {e}; {req:?}")
    });
    assert_eq!(
        back.result_code, result,
        "error response: parsed result code"
    );
    assert_eq!(back.lifetime, lifetime, "error response: parsed lifetime");
    assert_eq!(back.epoch, epoch, "error response: parsed epoch");
    assert_eq!(
        back.body, req.body,
        "error response: opcode body not echoed"
    );
    assert_eq!(
        back.options, req.options,
        "error response: options not echoed"
    );
}

/// Whether `a` is `b` with every option of code `code` left out.
fn options_without<'a>(
    a: impl Iterator<Item = PcpOption<'a>>,
    b: impl Iterator<Item = PcpOption<'a>>,
    code: OptionCode,
) -> bool {
    a.eq(b.filter(|o| o.code() != code))
}

fn remove_option(data: &[u8]) {
    let code = OptionCode::from(data.get(2).copied().unwrap_or(0) ^ 192);
    let mut buf = data.to_vec();
    let n = crate::remove_option(&mut buf, data.len(), code);
    assert!(
        n <= data.len(),
        "remove_option grew the message from {} to {n} octets",
        data.len()
    );
    let out = &buf[..n];
    if let Ok(req) = Request::parse(data) {
        let keep = HEADER_LEN + req.body.wire_len();
        assert_eq!(
            out[..keep],
            data[..keep],
            "remove_option: header or body changed"
        );
        let back = Request::parse(out)
            .unwrap_or_else(|e| panic!("request without option {code} does not parse: {e}"));
        assert_eq!(
            (
                back.lifetime,
                back.client_addr,
                back.body,
                back.pa_result_code
            ),
            (req.lifetime, req.client_addr, req.body, req.pa_result_code),
            "remove_option changed the request"
        );
        assert!(
            options_without(back.options.iter(), req.options.iter(), code),
            "remove_option({code}): {:?} -> {:?}",
            req.options,
            back.options
        );
    }
    if let Ok(resp) = Response::parse(data) {
        let keep = HEADER_LEN + resp.body.wire_len();
        assert_eq!(
            out[..keep],
            data[..keep],
            "remove_option: header or body changed"
        );
        let back = Response::parse(out)
            .unwrap_or_else(|e| panic!("response without option {code} does not parse: {e}"));
        assert_eq!(
            (back.result_code, back.lifetime, back.epoch, back.body),
            (resp.result_code, resp.lifetime, resp.epoch, resp.body),
            "remove_option changed the response"
        );
        assert!(
            options_without(back.options.iter(), resp.options.iter(), code),
            "remove_option({code}): {:?} -> {:?}",
            resp.options,
            back.options
        );
    }
}
