//! Build script: records the commit the binary is built from (`MIRRORMESH_COMMIT`, for `mirrormesh_build_info` and
//! the version line), from `git` when the source is a git checkout, "unknown" otherwise (a source tarball, a
//! package build without `.git`).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MIRRORMESH_COMMIT={commit}");
    // Run again when HEAD moves: a checkout (HEAD), a commit (the branch's ref, loose or packed).
    for what in ["HEAD", "packed-refs"] {
        if let Some(path) = git(&["rev-parse", "--git-path", what]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(path) = git(&["rev-parse", "--git-path", &head])
    {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
