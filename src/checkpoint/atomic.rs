//! Crash-safe writes: single files through a temporary sibling + fsync + rename, and whole
//! checkpoint directories through a temporary sibling directory that is swapped in.
//!
//! What survives a crash (power loss included, on file systems that honour fsync):
//!
//! * [`write_atomic`]: before the rename, `path` still holds its old content (or does not exist)
//!   and a `.NAME.tmp-*` file may be left beside it; after the rename, `path` holds the complete new
//!   content. A reader never sees a half-written `path`.
//! * [`write_checkpoint_dir_atomically`], with `final` the checkpoint directory:
//!   1. while `fill` runs, and until `final` is renamed away: `final` is the old checkpoint, intact;
//!      a `final.tmp-*` directory may be left over (removed by the next save);
//!   2. between renaming `final` to `final.old` and renaming the new directory to `final` (two
//!      renames, microseconds apart): `final` is missing and `final.old` holds the old, complete
//!      checkpoint. The next save renames it back first, and [`missing_checkpoint_hint`] tells a
//!      loader about it;
//!   3. after the second rename: `final` is the new, complete checkpoint; a stale `final.old` may
//!      be left and is removed by the next save.
//!
//! So at every instant either `final` or `final.old` is a complete checkpoint. One writer per
//! checkpoint directory is assumed: a save removes leftover `final.tmp-*` directories.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A suffix no other live writer in this or another process uses: pid, a per-process counter and
/// the clock's nanoseconds.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{count}-{nanos}", std::process::id())
}

/// The directory holding `path`, `.` for a bare file name.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_name_of(path: &Path) -> Result<String> {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .with_context(|| format!("{} does not name a file or directory", path.display()))
}

/// Flushes a directory's entries (new names, renames) to disk. Directories cannot be opened for
/// syncing on every platform; where they cannot, the rename is still atomic, only not yet durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let handle = fs::File::open(dir)
            .with_context(|| format!("cannot open directory {} to sync it", dir.display()))?;
        handle
            .sync_all()
            .with_context(|| format!("cannot sync directory {}", dir.display()))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Flushes a file's content to disk, through a fresh handle (fsync on any handle covers the file).
fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("cannot sync {} to disk", path.display()))
}

/// Writes `path` crash-safely: `fill` writes the content to the temporary path it is given (in
/// the same directory), which is then synced and renamed over `path`. On error the temporary file
/// is removed and `path` is untouched.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = parent_dir(path);
    let name = file_name_of(path)?;
    fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let temp_path = dir.join(format!(".{name}.tmp-{}", unique_suffix()));
    let written = fill(&temp_path)
        .and_then(|()| sync_file(&temp_path))
        .and_then(|()| {
            fs::rename(&temp_path, path).with_context(|| {
                format!(
                    "cannot move {} into place as {}",
                    temp_path.display(),
                    path.display()
                )
            })
        });
    if let Err(error) = written {
        let _ = fs::remove_file(&temp_path);
        return Err(error);
    }
    sync_dir(&dir)
}

/// Replaces `path` with `bytes` crash-safely (temporary file in the same directory, fsync, rename,
/// fsync of the directory): a reader sees either the old content or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |temp_path| {
        fs::write(temp_path, bytes).with_context(|| format!("cannot write {}", temp_path.display()))
    })
}

/// The sibling that holds the previous checkpoint while the new one is swapped in.
fn old_dir_of(final_dir: &Path) -> Result<PathBuf> {
    Ok(parent_dir(final_dir).join(format!("{}.old", file_name_of(final_dir)?)))
}

/// Syncs every file below `dir`, then the directories themselves, so the renamed directory holds
/// complete files whatever wrote them (callers may use plain `fs::write` or `fs::copy`).
fn sync_tree(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let kind = entry
            .file_type()
            .with_context(|| format!("cannot inspect {}", entry.path().display()))?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            sync_file(&entry.path())?;
        }
    }
    sync_dir(dir)
}

/// Writes a whole checkpoint directory crash-safely: `fill` writes every file into a fresh
/// temporary sibling directory (`final_dir.tmp-*`), which is then synced and swapped in for
/// `final_dir` (old one renamed to `final_dir.old`, new one renamed into place, old one removed).
///
/// If `fill` fails, the temporary directory is removed and `final_dir` is untouched. See the
/// module documentation for what a crash at each point leaves behind.
pub fn write_checkpoint_dir_atomically(
    final_dir: &Path,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let parent = parent_dir(final_dir);
    let name = file_name_of(final_dir)?;
    let old_dir = old_dir_of(final_dir)?;
    ensure_dir_or_absent(final_dir)?;
    fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create directory {}", parent.display()))?;

    // A crash in the middle of an earlier swap leaves only `.old`: it is the last complete
    // checkpoint, so put it back before anything else.
    if !final_dir.exists() && old_dir.is_dir() {
        fs::rename(&old_dir, final_dir).with_context(|| {
            format!(
                "cannot restore the interrupted checkpoint {} to {}",
                old_dir.display(),
                final_dir.display()
            )
        })?;
    }
    remove_leftover_temp_dirs(&parent, &name)?;

    let temp_dir = parent.join(format!("{name}.tmp-{}", unique_suffix()));
    fs::create_dir(&temp_dir)
        .with_context(|| format!("cannot create directory {}", temp_dir.display()))?;
    if let Err(error) = fill(&temp_dir).and_then(|()| sync_tree(&temp_dir)) {
        let _ = fs::remove_dir_all(&temp_dir);
        return Err(error.context(format!(
            "checkpoint {} was not written",
            final_dir.display()
        )));
    }

    if final_dir.exists() {
        if old_dir.exists() {
            fs::remove_dir_all(&old_dir)
                .with_context(|| format!("cannot remove stale {}", old_dir.display()))?;
        }
        fs::rename(final_dir, &old_dir).with_context(|| {
            format!(
                "cannot move {} aside to {}",
                final_dir.display(),
                old_dir.display()
            )
        })?;
    }
    fs::rename(&temp_dir, final_dir).with_context(|| {
        format!(
            "cannot move the new checkpoint {} into place as {} (the previous one is in {})",
            temp_dir.display(),
            final_dir.display(),
            old_dir.display()
        )
    })?;
    sync_dir(&parent)?;
    if old_dir.exists() {
        fs::remove_dir_all(&old_dir).with_context(|| {
            format!(
                "cannot remove the previous checkpoint {}",
                old_dir.display()
            )
        })?;
    }
    Ok(())
}

/// Removes `NAME.tmp-*` directories beside the checkpoint: what a crash during `fill` leaves.
fn remove_leftover_temp_dirs(parent: &Path, name: &str) -> Result<()> {
    let prefix = format!("{name}.tmp-");
    let entries =
        fs::read_dir(parent).with_context(|| format!("cannot list {}", parent.display()))?;
    for entry in entries.flatten() {
        let is_leftover = entry.file_name().to_string_lossy().starts_with(&prefix)
            && entry.file_type().map(|kind| kind.is_dir()).unwrap_or(false);
        if is_leftover {
            fs::remove_dir_all(entry.path()).with_context(|| {
                format!("cannot remove the leftover {}", entry.path().display())
            })?;
        }
    }
    Ok(())
}

/// When a checkpoint directory is missing because a save was interrupted mid-swap, returns a
/// sentence saying where the last complete checkpoint is; `None` otherwise.
pub fn missing_checkpoint_hint(final_dir: &Path) -> Option<String> {
    let old_dir = old_dir_of(final_dir).ok()?;
    if final_dir.exists() || !old_dir.is_dir() {
        return None;
    }
    Some(format!(
        "a save was interrupted and the last complete checkpoint is {}: rename it to {} (the next \
         save does this itself)",
        old_dir.display(),
        final_dir.display()
    ))
}

/// Fails when `dir` already exists as something other than a directory: keeps the swap from
/// renaming a user's file aside by mistake.
fn ensure_dir_or_absent(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!(
            "{} exists and is not a directory; choose another checkpoint path",
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trainer_state.json");
        write_atomic(&path, b"first, longer content").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first, longer content");
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(names_in(dir.path()), vec!["trainer_state.json"]);
    }

    #[test]
    fn write_atomic_creates_missing_parent_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/state.json");
        write_atomic(&path, b"{}").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"{}");
    }

    #[test]
    fn failed_write_atomic_keeps_old_content_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old").unwrap();
        let result = write_atomic_with(&path, |temp_path| {
            fs::write(temp_path, b"half")?;
            bail!("disk full")
        });
        assert!(result.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(names_in(dir.path()), vec!["state.json"]);
    }

    #[test]
    fn dir_swap_creates_a_new_checkpoint() {
        let runs = tempfile::tempdir().unwrap();
        let final_dir = runs.path().join("run/checkpoint");
        write_checkpoint_dir_atomically(&final_dir, |dir| {
            fs::write(dir.join("model.safetensors"), b"new model")?;
            Ok(())
        })
        .unwrap();
        assert_eq!(
            fs::read(final_dir.join("model.safetensors")).unwrap(),
            b"new model"
        );
        assert_eq!(names_in(&runs.path().join("run")), vec!["checkpoint"]);
    }

    #[test]
    fn dir_swap_replaces_an_existing_checkpoint_entirely() {
        let runs = tempfile::tempdir().unwrap();
        let final_dir = runs.path().join("checkpoint");
        fs::create_dir(&final_dir).unwrap();
        fs::write(final_dir.join("model.safetensors"), b"old model").unwrap();
        fs::write(final_dir.join("stale.txt"), b"only in the old one").unwrap();
        write_checkpoint_dir_atomically(&final_dir, |dir| {
            fs::write(dir.join("model.safetensors"), b"new model")?;
            Ok(())
        })
        .unwrap();
        assert_eq!(names_in(&final_dir), vec!["model.safetensors"]);
        assert_eq!(
            fs::read(final_dir.join("model.safetensors")).unwrap(),
            b"new model"
        );
        assert_eq!(names_in(runs.path()), vec!["checkpoint"]);
    }

    #[test]
    fn failed_fill_keeps_the_old_checkpoint() {
        let runs = tempfile::tempdir().unwrap();
        let final_dir = runs.path().join("checkpoint");
        fs::create_dir(&final_dir).unwrap();
        fs::write(final_dir.join("model.safetensors"), b"old model").unwrap();
        let result = write_checkpoint_dir_atomically(&final_dir, |dir| {
            fs::write(dir.join("model.safetensors"), b"half")?;
            bail!("out of disk space")
        });
        let message = format!("{:#}", result.unwrap_err());
        assert!(message.contains("out of disk space"), "{message}");
        assert_eq!(
            fs::read(final_dir.join("model.safetensors")).unwrap(),
            b"old model"
        );
        assert_eq!(names_in(runs.path()), vec!["checkpoint"]);
    }

    #[test]
    fn interrupted_swap_is_reported_then_repaired_by_the_next_save() {
        let runs = tempfile::tempdir().unwrap();
        let final_dir = runs.path().join("checkpoint");
        // State 2 of the module docs, plus a leftover temporary dir from a crash during fill.
        let old_dir = runs.path().join("checkpoint.old");
        fs::create_dir(&old_dir).unwrap();
        fs::write(old_dir.join("model.safetensors"), b"last good").unwrap();
        fs::create_dir(runs.path().join("checkpoint.tmp-1-2-3")).unwrap();
        let hint = missing_checkpoint_hint(&final_dir).unwrap();
        assert!(hint.contains("checkpoint.old"), "{hint}");

        // A save whose fill fails still restores the last complete checkpoint.
        let result = write_checkpoint_dir_atomically(&final_dir, |_| bail!("interrupted again"));
        assert!(result.is_err());
        assert_eq!(
            fs::read(final_dir.join("model.safetensors")).unwrap(),
            b"last good"
        );
        assert_eq!(names_in(runs.path()), vec!["checkpoint"]);
        assert!(missing_checkpoint_hint(&final_dir).is_none());
    }

    #[test]
    fn a_file_in_the_way_is_refused() {
        let runs = tempfile::tempdir().unwrap();
        let path = runs.path().join("checkpoint");
        fs::write(&path, b"user file").unwrap();
        let result = write_checkpoint_dir_atomically(&path, |_| Ok(()));
        assert!(result.unwrap_err().to_string().contains("not a directory"));
        assert_eq!(fs::read(&path).unwrap(), b"user file");
    }
}
