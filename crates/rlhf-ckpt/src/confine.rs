//! Confinement of paths a run reads back from its own files or requests (`ranking.json`'s
//! checkpoint names, `LATEST`, manifest entries, shard names of `model.safetensors.index.json`,
//! worker RPC directories): the one check every such path goes through before it is opened,
//! written or deleted. A path is confined when it names something inside its root after every
//! symlink on the way is resolved; `..`, absolute paths and symlinks that lead out are refused.
//!
//! The check resolves what exists when it runs; a component created later is not covered. The
//! directories checked here are written by the run itself, so a race with an attacker who can
//! already write inside the root is outside what this defends against.

use std::path::{Component, Path, PathBuf};

/// A path that would leave the directory it must stay in. The caller adds which file or field
/// it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} {reason}")]
pub struct PathEscape {
    /// The path as it was given.
    pub value: String,
    /// Why it is refused, naming the root it must stay in.
    pub reason: String,
}

impl PathEscape {
    fn new(value: impl Into<String>, reason: String) -> PathEscape {
        PathEscape {
            value: value.into(),
            reason,
        }
    }
}

/// `root/rel`, when `rel` is a relative, `/`-separated path of plain names (no `..`, no `.`, no
/// root, no `\`) and the result, with its symlinks resolved as far as it exists, stays inside
/// `root` (itself resolved). The path need not exist yet.
pub fn join_within(root: &Path, rel: &str) -> Result<PathBuf, PathEscape> {
    let plain = !rel.is_empty()
        && !rel.contains('\\')
        && Path::new(rel)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(PathEscape::new(
            rel,
            format!(
                "is not a relative path of plain names under {} (no `..`, no leading `/`)",
                root.display()
            ),
        ));
    }
    let path = root.join(rel);
    resolved_inside(&path, &[root.to_path_buf()]).map_err(|reason| PathEscape::new(rel, reason))?;
    Ok(path)
}

/// `path` itself, when it is absolute and, with its symlinks and `..` resolved as far as it
/// exists, lies inside one of `roots` (each resolved). For paths that arrive whole, such as the
/// directories in a worker's requests (a config's `models/../x` is legitimate, so `..` is judged
/// by where it leads). The part that does not exist yet must be plain names.
pub fn check_within(path: &Path, roots: &[PathBuf]) -> Result<PathBuf, PathEscape> {
    let shown = path.display().to_string();
    if !path.is_absolute() {
        return Err(PathEscape::new(
            shown,
            "is not an absolute path; give the full path".into(),
        ));
    }
    resolved_inside(path, roots).map_err(|reason| PathEscape::new(shown, reason))?;
    Ok(path.to_path_buf())
}

/// Resolves the longest existing ancestor of `path` (following every symlink), appends the rest
/// (plain names only, checked by the callers) and says whether the result lies in a resolved
/// root.
fn resolved_inside(path: &Path, roots: &[PathBuf]) -> Result<(), String> {
    let names = || {
        roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if roots.is_empty() {
        return Err("is outside every allowed directory (none are allowed)".into());
    }
    let mut resolved_roots = Vec::with_capacity(roots.len());
    for r in roots {
        match std::fs::canonicalize(r) {
            Ok(c) => resolved_roots.push(c),
            // A root that does not exist contains nothing yet; paths under it are judged by
            // name, and nothing there can be a symlink.
            Err(_) => resolved_roots.push(r.clone()),
        }
    }
    let mut existing = path;
    let mut rest = Vec::new();
    let resolved = loop {
        match std::fs::canonicalize(existing) {
            Ok(c) => break c,
            Err(_) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    existing = parent;
                }
                // `..` below a part that does not exist: where it leads cannot be resolved.
                _ => {
                    return Err(format!(
                        "has `..` after a part that does not exist; give an existing path under {}",
                        names()
                    ))
                }
            },
        }
    };
    let mut full = resolved;
    for name in rest.iter().rev() {
        full.push(name);
    }
    if resolved_roots.iter().any(|r| full.starts_with(r)) {
        return Ok(());
    }
    let via = if full.as_path() != path {
        format!(" (it resolves to {})", full.display())
    } else {
        String::new()
    };
    Err(format!(
        "is outside {}{via}; paths must stay inside it (symbolic links out of it are not followed)",
        names()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn plain_relative_names_are_joined() {
        let tmp = tempfile::tempdir().unwrap();
        let p = join_within(tmp.path(), "a/b.safetensors").unwrap();
        assert_eq!(p, tmp.path().join("a/b.safetensors"));
        std::fs::create_dir(tmp.path().join("a")).unwrap();
        join_within(tmp.path(), "a/b.safetensors").unwrap();
    }

    #[test]
    fn dot_dot_absolute_and_odd_forms_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "",
            ".",
            "./a",
            "a\\..\\b",
        ] {
            let e = join_within(tmp.path(), bad).unwrap_err();
            assert_eq!(e.value, bad);
            assert!(e.reason.contains("plain names"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused_and_inside_it_allowed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(root.join("real")).unwrap();
        symlink(outside.path(), root.join("out")).unwrap();
        symlink(root.join("real"), root.join("in")).unwrap();
        let e = join_within(&root, "out").unwrap_err();
        assert!(e.reason.contains("resolves to"), "{e}");
        // Also through a component that does not exist yet below the link.
        assert!(join_within(&root, "out/new/file").is_err());
        join_within(&root, "in/file").unwrap();
        // A root reached through a symlink is judged by where it resolves to.
        let alias = tmp.path().join("alias");
        symlink(&root, &alias).unwrap();
        join_within(&alias, "real").unwrap();
        assert!(join_within(&alias, "out").is_err());
    }

    #[test]
    fn whole_paths_must_be_absolute_and_inside_a_root() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let roots = [a.path().to_path_buf(), b.path().to_path_buf()];
        check_within(&a.path().join("x/y"), &roots).unwrap();
        check_within(b.path(), &roots).unwrap();
        let e = check_within(other.path(), &roots).unwrap_err();
        assert!(
            e.reason.contains(&a.path().display().to_string()),
            "the message names the roots: {e}"
        );
        let e = check_within(Path::new("rel/dir"), &roots).unwrap_err();
        assert!(e.reason.contains("absolute"), "{e}");
        let e = check_within(&a.path().join("../x"), &roots).unwrap_err();
        assert!(e.reason.contains("outside"), "{e}");
        // `..` that stays inside is judged by where it leads.
        std::fs::create_dir(a.path().join("sub")).unwrap();
        check_within(&a.path().join("sub/../y"), &roots).unwrap();
        let e = check_within(&a.path().join("missing/../../x"), &roots).unwrap_err();
        assert!(e.reason.contains("does not exist"), "{e}");
        symlink(other.path(), a.path().join("link")).unwrap();
        assert!(check_within(&a.path().join("link/state"), &roots).is_err());
        assert!(check_within(a.path(), &[]).is_err());
    }
}
