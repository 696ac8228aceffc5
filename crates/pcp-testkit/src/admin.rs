//! pcpd's admin API over HTTP/1.1 (loopback, no proxy, 5 s per request).

use std::net::SocketAddr;
use std::time::Duration;

fn agent(status_as_error: bool) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(status_as_error)
        .timeout_global(Some(Duration::from_secs(5)))
        .proxy(None)
        .build();
    ureq::Agent::new_with_config(config)
}

/// One HTTP request; the status and body, or why there was no answer.
pub fn try_http(method: &str, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let agent = agent(false);
    let url = format!("http://{addr}{path}");
    let resp = match method {
        "POST" => agent.post(&url).send_empty(),
        "DELETE" => agent.delete(&url).call(),
        _ => agent.get(&url).call(),
    };
    let mut resp = resp.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// One HTTP request; panics without an answer.
pub fn http(method: &str, addr: SocketAddr, path: &str) -> (u16, String) {
    try_http(method, addr, path).unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// `GET path`: the body when the status is a success, otherwise why not.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut resp = agent(true)
        .get(&format!("http://{addr}{path}"))
        .call()
        .map_err(|e| e.to_string())?;
    resp.body_mut().read_to_string().map_err(|e| e.to_string())
}

/// The value of the sample `key` (`name{labels}` exactly as exposed) in Prometheus text.
pub fn metric(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}
