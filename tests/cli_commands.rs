//! The commands operators script, through the real binary: `--version`, `key show`, `config check`, and the man
//! pages and completions `generate` writes for the packages.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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

/// The subcommands `mirrormesh --help` lists (hidden ones are not listed).
fn subcommands() -> Vec<String> {
    let help = text(&run(&["--help"]).stdout);
    let commands: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 12, "--help lists the commands: {commands:?}\n{help}");
    commands
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
