//! pcpd's process-level tests share their harness with the rest of the workspace in
//! `pcp-testkit`; these are the names they have always used from `common`.
#![allow(unused_imports)]

pub use pcp_testkit::{
    Answer, Builder, HaTiming, Map, Node, PairPlan, PcpClient, Pcpd, TempDir, free_port, fresh_ip,
    honour_config, http, kill_settled_active, metric, parse_answer, pcpd, poll, role, run,
    try_http, wait_for, wait_ha, workspace_root,
};
