//! The commands operators script, through the real binary: `--version`, `key show`, `config check`, the man
//! pages and completions `generate` writes for the packages, and `wait` against real daemons on loopback (an origin
//! and two mirrors): it returns as soon as a mirror (or, with `--all`, every member the origin knows) serves the
//! snapshot, also when started before the publish; its exit status says whether the snapshot was reached (0), the
//! timeout passed first (124) or the node could not be asked (1). Every wait is on an event: the command's own
//! long-poll, or the admin API's.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use mirrormesh::gentree::{self, GenTreeArgs};
use mirrormesh::local_fabric::{LocalFabric, NodeOptions};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mirrormesh"))
}

fn run(args: &[&str]) -> Output {
    Command::new(binary()).args(args).env_remove("MIRRORMESH_TOKEN").stdin(Stdio::null()).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn packaging(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging").join(name)
}

/// The subcommands `mirrormesh --help` lists.
fn subcommands() -> Vec<String> {
    support::subcommands(std::path::Path::new(env!("CARGO_BIN_EXE_mirrormesh")))
}

#[test]
fn version_names_the_commit_the_binary_was_built_from() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    let line = text(&out.stdout);
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| text(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(line, format!("mirrormesh {} (commit {commit})\n", env!("CARGO_PKG_VERSION")));
    // The same commit as the metric reports.
    assert_eq!(mirrormesh::metrics::COMMIT, commit);
}

#[test]
fn key_show_prints_the_node_id_of_an_existing_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    let made = run(&["keygen", "--out", path.to_str().unwrap()]);
    assert!(made.status.success(), "{}", text(&made.stderr));
    let key = mirrormesh::key::NodeKey::load(&path).unwrap();
    let out = run(&["key", "show", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains(&format!("node id    {}\n", key.peer_id())), "{shown}");
    let public: String = key.publisher_key().0.iter().map(|b| format!("{b:02x}")).collect();
    assert!(shown.contains(&format!("public key {public}\n")), "{shown}");
    // What keygen printed is what key show prints.
    assert_eq!(shown, text(&made.stdout));

    let missing = dir.path().join("absent.key");
    let out = run(&["key", "show", missing.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("absent.key") && err.contains("No such file"), "{err}");

    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n").unwrap();
    let out = run(&["key", "show", bad.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.key") && err.contains("not an ed25519 PKCS#8 PEM key"), "{err}");
    assert!(out.stdout.is_empty(), "nothing on stdout for a bad key");
}

/// A copy of a shipped config under `dir`, with its key, tree and state there, and a key generated for it.
fn shipped_config(dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(packaging(name)).unwrap();
    let base = dir.display().to_string();
    let text = text.replace("/etc/mirrormesh", &base).replace("/var/lib/mirrormesh", &format!("{base}/state"));
    let text = text.replace("/srv/mirror", &format!("{base}/srv"));
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    if !dir.join("node.key").exists() {
        mirrormesh::key::NodeKey::generate().unwrap().save(&dir.join("node.key")).unwrap();
    }
    path
}

fn check(path: &Path) -> Output {
    run(&["config", "check", path.to_str().unwrap()])
}

#[test]
fn config_check_passes_the_shipped_configs_and_names_the_key_of_every_problem() {
    for name in ["mirror.toml", "origin.toml"] {
        let dir = tempfile::tempdir().unwrap();
        let path = shipped_config(dir.path(), name);
        let out = check(&path);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
        let ok = text(&out.stdout);
        let key = mirrormesh::key::NodeKey::load(&dir.path().join("node.key")).unwrap();
        assert!(ok.starts_with(&format!("{}: OK: ", path.display())), "{ok}");
        assert!(ok.contains(&key.peer_id().to_string()) && ok.contains("repository alpine"), "{ok}");
        assert!(ok.contains(if name == "origin.toml" { "origin" } else { "mirror" }), "{ok}");
    }

    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(shipped_config(dir.path(), "mirror.toml")).unwrap();
    let origin_text = std::fs::read_to_string(shipped_config(dir.path(), "origin.toml")).unwrap();
    let bad = |name: &str, body: String, key_named: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        let out = check(&path);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(out.stdout.is_empty(), "{name}: no OK on stdout");
        assert!(err.contains(key_named), "{name}: the error names {key_named}:\n{err}");
        assert!(err.contains(&format!("{}: error: ", path.display())), "{name}: {err}");
        assert!(err.trim_end().ends_with("test failed (1 problem(s))"), "{name}: {err}");
    };
    bad("unknown-key.toml", good.replace("[admin]\n", "[admin]\nlistne = \"x\"\n"), "listne");
    bad(
        "bad-listen.toml",
        good.replace("listen = \"/ip4/0.0.0.0/udp/4001/quic-v1\"", "listen = \"nope\""),
        "network.listen",
    );
    bad("public-admin.toml", good.replace("listen = \"127.0.0.1:7480\"", "listen = \"0.0.0.0:7480\""), "admin.token");
    bad("no-publisher.toml", good.replace("publishers = [", "publishers = [] # ["), "trust.publishers");
    bad("syntax.toml", good.replace("[network]", "[network"), "network");
    bad(
        "missing-key.toml",
        good.replace(&format!("{}/node.key", dir.path().display()), "/nonexistent/node.key"),
        "node.key: /nonexistent/node.key does not exist",
    );
    // The daemon refuses an origin's (the publisher's) key readable by others: so does the check.
    std::fs::set_permissions(dir.path().join("node.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    bad("origin-key-readable.toml", origin_text, "node.key: key file");
    // Every problem is reported, each with its key.
    let several = dir.path().join("several.toml");
    let body = good
        .replace("listen = \"/ip4/0.0.0.0/udp/4001/quic-v1\"", "listen = \"nope\"")
        .replace("data_listen = \"0.0.0.0:4002\"", "data_listen = \"nowhere\"")
        .replace("listen = \"127.0.0.1:7480\"", "listen = \"0.0.0.0:7480\"")
        .replace("delete_grace_secs = 300", "delete_grace_secs = 300\nstale_after_secs = 0");
    std::fs::write(&several, body).unwrap();
    let out = check(&several);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for key in ["network.listen", "network.data_listen", "admin.token", "repo.stale_after_secs"] {
        let line =
            err.lines().find(|l| l.contains(&format!("error: {key}: "))).unwrap_or_else(|| panic!("{key}:\n{err}"));
        assert!(line.starts_with(&format!("{}: error: ", several.display())), "{line}");
    }
    assert!(err.trim_end().ends_with("test failed (4 problem(s))"), "{err}");
    let missing = check(&dir.path().join("absent.toml"));
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("absent.toml"), "{}", text(&missing.stderr));
}

#[test]
fn generate_writes_man_pages_and_completions_naming_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["generate", "--out", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let commands = subcommands();
    for wanted in ["wait", "config", "key", "daemon", "status", "demo"] {
        assert!(commands.iter().any(|c| c == wanted), "--help lists {wanted}: {commands:?}");
    }
    assert!(!commands.iter().any(|c| c == "generate"), "generate is hidden: {commands:?}");

    let man = std::fs::read_to_string(dir.path().join("man1/mirrormesh.1")).unwrap();
    assert!(man.starts_with(".ie") || man.contains(".TH mirrormesh 1"), "a roff page:\n{man}");
    for command in &commands {
        // roff writes a hyphen as `\-`.
        let roff = command.replace('-', "\\-");
        assert!(man.contains(&format!("mirrormesh\\-{roff}(1)")), "mirrormesh.1 names {command}");
        let page = dir.path().join(format!("man1/mirrormesh-{command}.1"));
        let page = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(page.contains(".SH SYNOPSIS"), "mirrormesh-{command}.1");
    }
    assert!(!dir.path().join("man1/mirrormesh-generate.1").exists(), "no page for the hidden command");
    let check_page = std::fs::read_to_string(dir.path().join("man1/mirrormesh-config-check.1")).unwrap();
    assert!(check_page.contains("validate"), "subcommands of subcommands get their page:\n{check_page}");

    for name in ["mirrormesh.bash", "_mirrormesh", "mirrormesh.fish"] {
        let script = std::fs::read_to_string(dir.path().join("completions").join(name)).unwrap();
        for command in &commands {
            assert!(script.contains(command.as_str()), "{name} completes {command}");
        }
        assert!(script.contains("--admin") && script.contains("--timeout"), "{name} completes options");
    }
    // Each is valid for its shell, where the shell is installed (bash always is).
    let bash = Command::new("bash").arg("-n").arg(dir.path().join("completions/mirrormesh.bash")).status().unwrap();
    assert!(bash.success());
    for (shell, name) in [("zsh", "_mirrormesh"), ("fish", "mirrormesh.fish")] {
        if let Ok(status) = Command::new(shell).arg("-n").arg(dir.path().join("completions").join(name)).status() {
            assert!(status.success(), "{shell} -n {name}");
        }
    }
}

fn wait_command(fabric: &LocalFabric, node: usize, args: &[&str]) -> Command {
    let mut command = Command::new(binary());
    command
        .args(["wait", "--admin", &fabric.nodes[node].admin.to_string()])
        .args(args)
        .env_remove("MIRRORMESH_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn wait(fabric: &LocalFabric, node: usize, args: &[&str]) -> Output {
    wait_command(fabric, node, args).output().unwrap()
}

#[test]
fn wait_returns_once_a_mirror_or_the_whole_fabric_serves_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let options = vec![NodeOptions { delete_grace_secs: 0, ..NodeOptions::default() }; 3];
    let mut fabric = LocalFabric::create(dir.path(), binary(), 2, &options).unwrap();
    let tree = fabric.nodes[0].tree.clone();
    gentree::generate(&GenTreeArgs { out: tree.clone(), fraction: 0.002, seed: 1, ..GenTreeArgs::default() }).unwrap();
    fabric.start_all().unwrap();

    // No snapshot yet: without --seq there is nothing to wait for (an error); with one, --timeout 0 says "not yet".
    let none = wait(&fabric, 1, &["--timeout", "0"]);
    assert_eq!(none.status.code(), Some(1), "{}", text(&none.stderr));
    assert!(text(&none.stderr).contains("knows of no snapshot yet"), "{}", text(&none.stderr));
    let early = wait(&fabric, 1, &["--seq", "1", "--timeout", "0"]);
    assert_eq!(early.status.code(), Some(124), "{}", text(&early.stderr));
    assert!(text(&early.stderr).contains("timed out after 0 s waiting for seq 1"), "{}", text(&early.stderr));

    let first = fabric.publish().unwrap().seq;
    let seq = first.to_string();
    let mirror = wait(&fabric, 1, &["--seq", &seq, "--timeout", "120"]);
    assert_eq!(mirror.status.code(), Some(0), "{}", text(&mirror.stderr));
    let said = text(&mirror.stdout);
    assert!(said.contains(&fabric.nodes[1].peer_id) && said.contains(&format!("serves alpine seq {first}")), "{said}");
    assert_eq!(fabric.status(1).unwrap().repos[0].seq, Some(first), "mirror1 serves it once wait returned");

    // The origin's newest (no --seq), everywhere.
    let all = wait(&fabric, 0, &["--all", "--timeout", "120"]);
    assert_eq!(all.status.code(), Some(0), "{}", text(&all.stderr));
    assert!(text(&all.stdout).contains("and so do its 2 connected peers"), "{}", text(&all.stdout));
    for i in 1..3 {
        assert_eq!(fabric.status(i).unwrap().repos[0].seq, Some(first), "{} serves it", fabric.nodes[i].name);
    }

    // Started before the next publish, for any newer snapshot: returns once every mirror serves it.
    let next = (first + 1).to_string();
    let waiter = wait_command(&fabric, 0, &["--all", "--seq", &next, "--timeout", "120"]).spawn().unwrap();
    gentree::generate(&GenTreeArgs { out: tree, update: Some(2), seed: 2, ..GenTreeArgs::default() }).unwrap();
    let second = fabric.publish().unwrap().seq;
    let done = waiter.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(0), "{}", text(&done.stderr));
    assert!(text(&done.stdout).contains(&format!("serves alpine seq {second}")), "{}", text(&done.stdout));
    for i in 1..3 {
        assert_eq!(fabric.status(i).unwrap().repos[0].seq, Some(second), "{} serves it", fabric.nodes[i].name);
    }

    // A snapshot nobody has: the timeout's status, and who is behind.
    let future = (second + 1000).to_string();
    let late = wait(&fabric, 0, &["--all", "--seq", &future, "--timeout", "0"]);
    let err = text(&late.stderr);
    assert_eq!(late.status.code(), Some(124), "{err}");
    assert!(
        err.contains(&format!("waiting for seq {future}")) && err.contains(&format!("serves seq {second}")),
        "{err}"
    );
    for i in 1..3 {
        assert!(err.contains(&format!("behind: {} holds seq {second}", fabric.nodes[i].peer_id)), "{err}");
    }

    // Nobody answers: an error, not a timeout.
    let port = mirrormesh::local_fabric::free_port().unwrap().to_string();
    let gone = Command::new(binary()).args(["wait", "--admin", &format!("127.0.0.1:{port}"), "--seq", "1"]).output();
    let gone = gone.unwrap();
    assert_eq!(gone.status.code(), Some(1), "{}", text(&gone.stderr));
    assert!(text(&gone.stderr).contains("cannot reach the mirrormesh daemon"), "{}", text(&gone.stderr));
}
