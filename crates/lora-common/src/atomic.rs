//! Crash-safe outputs: every file or directory the tool writes is first built under a recognisable temporary
//! name beside its target, then renamed into place, so a reader sees it whole or not at all.
//!
//! The temporary name is `.lora-boundary-partial.<pid>.<target name>.tmp`. A process killed mid-write (SIGKILL,
//! power loss) leaves that entry behind; the next write into the same directory removes every such entry whose
//! process is gone ([`clean_stale`]), so garbage never accumulates. Entries of live processes are left alone.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let target = dir.path().join("report.json");
//! lora_common::atomic::write_file(&target, b"{}")?;
//! assert_eq!(std::fs::read(&target)?, b"{}");
//! // A directory output: build it under its partial name, then commit.
//! let out = lora_common::atomic::PartialDir::create(&dir.path().join("adapter"))?;
//! std::fs::write(out.path().join("a.txt"), "x")?;
//! out.commit()?;
//! assert!(dir.path().join("adapter/a.txt").exists());
//! # Ok(()) }
//! ```
use std::path::{Path, PathBuf};

use crate::error::{CommonError, Result};

/// Prefix of every temporary entry the tool creates.
pub const PARTIAL_PREFIX: &str = ".lora-boundary-partial.";

/// The temporary sibling of `target` that this process writes before renaming.
pub fn partial_path(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!("{PARTIAL_PREFIX}{}.{name}.tmp", std::process::id()))
}

/// The directory `target` lives in (`.` for a bare file name).
fn parent_of(target: &Path) -> &Path {
    target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Whether process `pid` still runs. Where this cannot be known, it is assumed to run (nothing is removed).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Removes the temporary entries in `dir` left by processes that no longer run; returns what it removed.
///
/// Failures to list or remove are ignored: cleaning is a courtesy, never a reason to fail a write.
pub fn clean_stale(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return removed };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PARTIAL_PREFIX)) else { continue };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path).is_ok(),
            Ok(_) => std::fs::remove_file(&path).is_ok(),
            Err(_) => false,
        };
        if gone {
            tracing::info!("removed {} (left by a process that no longer runs)", path.display());
            removed.push(path);
        }
    }
    removed
}

/// Writes a file atomically: the bytes go to [`partial_path`], are flushed to the disk, and the file is then
/// renamed to `path` (so that after a power loss `path` holds either its old contents or all of the new ones).
pub fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    clean_stale(parent_of(path));
    let tmp = partial_path(path);
    if let Err(e) = std::fs::write(&tmp, contents) {
        let _ = std::fs::remove_file(&tmp);
        return Err(CommonError::Io { path: path.to_path_buf(), source: e });
    }
    commit_file(&tmp, path)
}

/// Puts the finished file `tmp` (written beside `path`, e.g. at [`partial_path`]) in place: flushes it to the disk,
/// renames it to `path` and flushes the directory's entry. `tmp` is removed if any step fails.
pub fn commit_file(tmp: &Path, path: &Path) -> Result<()> {
    let moved = sync_file(tmp)
        .and_then(|()| std::fs::rename(tmp, path).map_err(|e| CommonError::Io { path: path.to_path_buf(), source: e }));
    if moved.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    moved?;
    sync_parent(path);
    Ok(())
}

/// Flushes a written file's contents to the disk (before it is renamed into place).
fn sync_file(path: &Path) -> Result<()> {
    // Opened for writing: some platforms flush only through a writable handle.
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| CommonError::Io { path: path.to_path_buf(), source: e })
}

/// Flushes every regular file under `dir` (recursively) to the disk.
fn sync_tree(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| CommonError::Io { path: dir.to_path_buf(), source: e })?;
    for entry in entries {
        let entry = entry.map_err(|e| CommonError::Io { path: dir.to_path_buf(), source: e })?;
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => sync_tree(&path)?,
            Ok(t) if t.is_file() => sync_file(&path)?,
            _ => {}
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Flushes the entry of `target` (a file or directory just renamed into place) in its directory to the disk.
pub fn sync_parent(target: &Path) {
    sync_dir(parent_of(target));
}

/// Flushes a directory's entries (a rename into it) to the disk, where the platform allows it (best effort:
/// some file systems refuse `fsync` on a directory, which changes nothing about the data already synced).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A directory output under construction: created under its partial name, renamed into place by
/// [`PartialDir::commit`], removed if dropped without committing (an error on the way out).
#[derive(Debug)]
pub struct PartialDir {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl PartialDir {
    /// Starts writing directory `target`, which must not exist yet (an existing path is refused).
    pub fn create(target: &Path) -> Result<Self> {
        if target.exists() {
            return Err(CommonError::Exists { path: target.to_path_buf() });
        }
        let parent = parent_of(target);
        std::fs::create_dir_all(parent).map_err(|e| CommonError::Io { path: parent.to_path_buf(), source: e })?;
        clean_stale(parent);
        let tmp = partial_path(target);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| CommonError::Io { path: tmp.clone(), source: e })?;
        Ok(PartialDir { tmp, target: target.to_path_buf(), committed: false })
    }

    /// Where to write the directory's files meanwhile.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the finished directory into place.
    pub fn commit(mut self) -> Result<()> {
        if self.target.exists() {
            return Err(CommonError::Exists { path: self.target.clone() });
        }
        // Everything inside reaches the disk before the directory appears under its final name.
        sync_tree(&self.tmp)?;
        std::fs::rename(&self.tmp, &self.target)
            .map_err(|e| CommonError::Io { path: self.target.clone(), source: e })?;
        self.committed = true;
        sync_parent(&self.target);
        Ok(())
    }
}

impl Drop for PartialDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_entries_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        // 4294967295 is above Linux's pid_max (at most 2^22), so no process has it.
        let dead = dir.path().join(format!("{PARTIAL_PREFIX}4294967295.merged.tmp"));
        std::fs::create_dir_all(dead.join("sub")).unwrap();
        std::fs::write(dead.join("sub/model.safetensors"), b"partial").unwrap();
        let dead_file = dir.path().join(format!("{PARTIAL_PREFIX}4294967295.report.json.tmp"));
        std::fs::write(&dead_file, b"{").unwrap();
        let live = partial_path(&dir.path().join("other"));
        std::fs::create_dir(&live).unwrap();
        let unrelated = dir.path().join("keep.tmp");
        std::fs::write(&unrelated, b"x").unwrap();
        let removed = clean_stale(dir.path());
        if cfg!(target_os = "linux") {
            assert_eq!(removed.len(), 2, "{removed:?}");
            assert!(!dead.exists() && !dead_file.exists());
        }
        assert!(live.exists() && unrelated.exists());
    }

    #[test]
    fn a_dropped_partial_dir_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        {
            let p = PartialDir::create(&target).unwrap();
            std::fs::write(p.path().join("f"), b"x").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(PartialDir::create(dir.path()).is_err(), "an existing path is refused");
    }
}
