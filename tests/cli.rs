//! The command line in pipes and on terminals, through the real binary against a stub admin API (a loopback HTTP
//! server that answers `/status`, `/peers`, `/repos` and `/publish` with fixed data):
//!
//! - a reader that closes early (`mirrormesh status | true`, `mirrormesh peers --json | head -1`) ends every
//!   command quietly with status 0, never a panic.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use mirrormesh::status::{PeerStatus, PublishReply, RepoStatus, Status};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

/// A peer with an id and addresses as long as real ones (a table of a few of them is wider than 120 columns).
fn peer(i: usize) -> PeerStatus {
    PeerStatus {
        id: format!("12D3KooWStubPeerIdentifierThatIsAsLongAsARealOne{i:05}"),
        address: format!("/ip4/192.0.2.{}/udp/4001/quic-v1", i % 250),
        data_address: Some(format!("[2001:db8:ffff:ffff:ffff:ffff:ffff:{:04x}]:4002", i % 0xffff)),
        origin: i == 0,
        connected: true,
        rtt_ms: Some(12.5),
        bytes_received: 5 << 20,
        complete_seq: Some(7),
        connected_since_ms: 1,
        ..Default::default()
    }
}

fn stub_status(peers: usize) -> Status {
    Status {
        node_id: "12D3KooWStubNodeIdentifierOfTheNodeAskedAboutXXXXXX".into(),
        role: "mirror".into(),
        repos: vec![RepoStatus {
            name: "alpine".into(),
            seq: Some(7),
            root: Some("ab".repeat(32)),
            state: "idle".into(),
            phase: "idle".into(),
            progress: 1.0,
            ..Default::default()
        }],
        peers: (0..peers).map(peer).collect(),
        ..Default::default()
    }
}

/// A stub admin API on loopback serving `status` until the test process ends. Returns its address.
fn stub(status: Status) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let publish = PublishReply {
        repo: "alpine".into(),
        seq: 8,
        root: "cd".repeat(32),
        files: 3,
        bytes: 300,
        changes: 1,
        delta_bytes: Some(120),
        changed_files: 1,
        changed_bytes: 100,
    };
    let bodies = [
        ("GET /status ", serde_json::to_string(&status).unwrap()),
        ("GET /peers ", serde_json::to_string(&status.peers).unwrap()),
        ("GET /repos ", serde_json::to_string(&status.repos).unwrap()),
        ("POST /publish ", serde_json::to_string(&publish).unwrap()),
    ];
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            answer(stream, &bodies);
        }
    });
    addr
}

/// Reads one request head and answers it with the body for its method and path (404 for anything else).
fn answer(stream: TcpStream, bodies: &[(&str, String)]) {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let found = bodies.iter().find(|(prefix, _)| request_line.starts_with(prefix));
    let (code, body) = match found {
        Some((_, body)) => ("200 OK", body.as_str()),
        None => ("404 Not Found", "not found\n"),
    };
    let mut stream = reader.into_inner();
    // The client may be gone already (a test that closes its output early); nothing to do about it here.
    let _ = write!(
        stream,
        "HTTP/1.1 {code}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Runs the binary with its standard output a pipe whose reading end is already closed: its first write fails
/// with EPIPE, as in `mirrormesh status | true` once `true` has exited.
fn run_into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(binary())
        .args(args)
        .env_remove("MIRRORMESH_TOKEN")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn assert_quiet_success(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{what}: exit status {:?}, stderr:\n{stderr}", out.status);
    assert!(stderr.is_empty(), "{what}: nothing on stderr, got:\n{stderr}");
}

#[test]
fn every_command_exits_quietly_into_a_closed_pipe() {
    let addr = stub(stub_status(3)).to_string();
    for command in ["status", "peers", "repos"] {
        for json in [false, true] {
            let mut args = vec![command, "--admin", &addr];
            if json {
                args.push("--json");
            }
            assert_quiet_success(&args.join(" "), &run_into_closed_pipe(&args));
        }
    }
    assert_quiet_success("publish --admin", &run_into_closed_pipe(&["publish", "--admin", &addr]));

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.key");
    assert_quiet_success("keygen", &run_into_closed_pipe(&["keygen", "--out", key.to_str().unwrap()]));
    assert!(key.exists(), "the key is written even though nobody reads what keygen prints");

    // Commands whose printing lives outside the CLI's own code are covered too.
    let tree = dir.path().join("tree");
    let out = run_into_closed_pipe(&["gen-tree", tree.to_str().unwrap(), "--fraction", "0.001", "--seed", "1"]);
    assert_quiet_success("gen-tree", &out);
    assert!(tree.join("alpine").exists(), "gen-tree still did its work");

    let state = dir.path().join("state");
    let (tree, key, state) = (tree.to_str().unwrap(), key.to_str().unwrap(), state.to_str().unwrap());
    assert_quiet_success(
        "publish --tree",
        &run_into_closed_pipe(&["publish", "--tree", tree, "--key", key, "--state", state]),
    );
    assert!(Path::new(state).read_dir().unwrap().next().is_some(), "the offline publish wrote its state");
}

#[test]
fn peers_json_into_head_exits_quietly() {
    // Far more JSON than a pipe buffers (64 KiB), so the binary is still writing when `head` exits.
    let addr = stub(stub_status(20_000)).to_string();
    let out = Command::new("bash")
        .args([
            "-c",
            "set -o pipefail; \"$0\" peers --json --admin \"$1\" | head -1",
            binary().to_str().unwrap(),
            &addr,
        ])
        .env_remove("MIRRORMESH_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_quiet_success("peers --json | head -1", &out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[\n", "head printed the first line");
}
