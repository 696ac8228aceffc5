//! Encodes a MAP request carrying CHECKPOINT_REQUIRED, prints it, and decodes it back.
use pcp_proto::{Body, MapBody, Options, PcpOption, Request, ResultCode, protocol};

fn main() {
    let opts = [PcpOption::CheckpointRequired];
    let req = Request {
        lifetime: 3600,
        client_addr: "192.0.2.10".parse().unwrap(),
        body: Body::Map(MapBody {
            nonce: *b"demo-nonce-1",
            protocol: protocol::UDP,
            internal_port: 5060,
            external_port: 0,
            external_addr: "0.0.0.0".parse().unwrap(),
        }),
        options: Options::from_list(&opts),
        pa_result_code: ResultCode::Success,
    };
    let mut buf = [0u8; pcp_proto::MAX_MESSAGE_LEN];
    let n = req.emit(&mut buf).expect("fits");
    for chunk in buf[..n].chunks(4) {
        println!(
            "{}",
            chunk
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let back = Request::parse(&buf[..n]).expect("parses");
    println!("{back:#?}");
    println!(
        "checkpoint requested: {}",
        back.options.checkpoint_required()
    );
}
