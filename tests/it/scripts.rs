//! The on-demand shell scripts (benchmarks, the profile-guided build, the test
//! command) are not run in CI, so at least their syntax is checked here.

use std::path::Path;
use std::process::Command;

#[test]
fn shell_scripts_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut scripts = vec![root.join("scripts/test"), root.join("scripts/build-pgo")];
    for dir in ["bench", ".ci"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("read script dir") {
            let path = entry.expect("dir entry").path();
            let is_shell = path.extension().is_some_and(|e| e == "sh")
                || path.file_name().is_some_and(|n| n == "run");
            if is_shell {
                scripts.push(path);
            }
        }
    }
    assert!(scripts.len() >= 8, "scripts found: {scripts:?}");
    for script in &scripts {
        let out = Command::new("bash")
            .arg("-n")
            .arg(script)
            .output()
            .expect("run bash -n");
        assert!(
            out.status.success(),
            "{} does not parse: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
