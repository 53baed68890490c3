//! Helpers shared by the integration tests that look at the command line.

use std::path::Path;

/// The subcommands `BINARY --help` lists (hidden ones are not listed); fails unless every subcommand the product
/// documents is among them.
pub fn subcommands(binary: &Path) -> Vec<String> {
    let out = std::process::Command::new(binary).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let commands: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    let documented =
        ["keygen", "key", "config", "daemon", "publish", "status", "peers", "repos", "wait", "gen-tree", "demo"];
    assert!(
        documented.iter().all(|c| commands.iter().any(|k| k == c)),
        "--help lists the commands: {commands:?}\n{help}"
    );
    commands
}
