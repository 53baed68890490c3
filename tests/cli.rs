//! The command line in pipes and on terminals, through the real binary against a stub admin API (a loopback HTTP
//! server that answers `/status`, `/peers`, `/repos` and `/publish` with fixed data):
//!
//! - a reader that closes early (`mirrormesh status | true`, `mirrormesh peers --json | head -1`) ends every
//!   command quietly with status 0, never a panic;
//! - in a pipe, tables are never cut (whatever `COLUMNS` says); on a terminal they fit its width.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
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
    assert_quiet_success("key show", &run_into_closed_pipe(&["key", "show", key.to_str().unwrap()]));
    assert_quiet_success("--version", &run_into_closed_pipe(&["--version"]));

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

#[test]
fn tables_in_a_pipe_are_never_cut() {
    let status = stub_status(3);
    let addr = stub(status.clone()).to_string();
    for command in ["status", "peers"] {
        // Not even when COLUMNS is exported (shells and CI runners do): a pipe has no width.
        for columns in [None, Some("60")] {
            let mut cmd = Command::new(binary());
            cmd.args([command, "--admin", &addr]).env_remove("MIRRORMESH_TOKEN").stdin(Stdio::null());
            match columns {
                Some(c) => cmd.env("COLUMNS", c),
                None => cmd.env_remove("COLUMNS"),
            };
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{command}: {}", String::from_utf8_lossy(&out.stderr));
            let text = String::from_utf8(out.stdout).unwrap();
            assert!(!text.contains('…'), "{command} (COLUMNS={columns:?}) cut a cell in a pipe:\n{text}");
            for p in &status.peers {
                assert!(text.contains(&p.id), "{command} (COLUMNS={columns:?}): whole id {}:\n{text}", p.id);
                assert!(text.contains(p.data_address.as_deref().unwrap()), "{command}: whole address:\n{text}");
            }
            for title in ["RTT", "RECEIVED", "SENT", "CHUNKS IN/OUT", "FAIL", "SCORE", "SEQ"] {
                assert!(text.contains(title), "{command} (COLUMNS={columns:?}): column {title} left out:\n{text}");
            }
        }
    }
}

/// Runs the binary with its standard output a terminal (a pseudo-terminal `cols` wide) and returns what it printed.
fn run_on_terminal(args: &[&str], cols: u16) -> String {
    let mut master = -1;
    let mut slave = -1;
    let size = libc::winsize { ws_row: 50, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: openpty writes two new descriptors into the given integers and reads the window size.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned by nothing else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = Command::new(binary())
        .args(args)
        .env_remove("COLUMNS")
        .env_remove("MIRRORMESH_TOKEN")
        .stdin(Stdio::null())
        .stdout(slave)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The terminal reports end of input (EIO on Linux) once the child, the last holder of its other side, exits.
    let mut printed = Vec::new();
    let _ = std::fs::File::from(master).read_to_end(&mut printed);
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(child.wait().unwrap().success(), "{args:?}: {stderr}");
    String::from_utf8(printed).unwrap().replace("\r\n", "\n")
}

#[test]
fn tables_on_a_terminal_fit_its_width() {
    let status = stub_status(3);
    let addr = stub(status.clone()).to_string();
    for command in ["status", "peers"] {
        let text = run_on_terminal(&[command, "--admin", &addr], 80);
        assert!(text.contains("PEER"), "{command}:\n{text}");
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "{command}: {line:?} is wider than the terminal:\n{text}");
        }
        assert!(text.contains('…'), "{command}: long ids are cut in the middle to fit:\n{text}");
    }
}
