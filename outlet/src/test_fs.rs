//! Test helper shared by the unit tests of the outlet's stores: are their files private?

/// Every entry under `dir` whose mode is not private (directories 0700, files 0600), and
/// how many entries there were.
pub(crate) fn open_entries(dir: &std::path::Path) -> (Vec<String>, usize) {
    use std::os::unix::fs::PermissionsExt;
    let mut open = Vec::new();
    let mut seen = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            let meta = std::fs::symlink_metadata(&p).expect("meta");
            let want = if meta.is_dir() {
                pending.push(p.clone());
                0o700
            } else {
                0o600
            };
            seen += 1;
            if meta.permissions().mode() & 0o777 != want {
                open.push(format!("{} {:o}", p.display(), meta.permissions().mode()));
            }
        }
    }
    (open, seen)
}
