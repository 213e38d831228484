//! Checkpoints: which work items of a plan are done and durable, so that a copy restarted after
//! a crash or a lost connection continues where it stopped.
//!
//! The file is JSON, written to a temporary name, fsynced and renamed over the old one. An item
//! is recorded only after the target was flushed, so everything a checkpoint names is on the
//! target's stable storage. A checkpoint made for another plan (other disk, other extents,
//! other request size) is refused rather than trusted.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{MoverError, Result};

const FORMAT: &str = "mover-checkpoint";
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct OnDisk {
    format: String,
    version: u32,
    source: String,
    target: String,
    disk_size: u64,
    items: usize,
    /// The plan's fingerprint, as a decimal string (JSON numbers lose 64-bit precision).
    plan: String,
    /// Done items as half-open index ranges.
    done: Vec<(usize, usize)>,
}

/// Identity of the copy a checkpoint belongs to.
#[derive(Clone, Debug)]
pub struct CheckpointKey {
    pub source: String,
    pub target: String,
    pub disk_size: u64,
    pub items: usize,
    pub plan: u64,
}

/// A set of done item indices, updated by workers without a lock.
#[derive(Debug)]
pub struct DoneSet {
    words: Vec<AtomicU64>,
}

impl DoneSet {
    #[must_use]
    pub fn new(len: usize) -> Self {
        Self {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Item `i` is done: its writes have returned. Release, so that whoever sees the mark (the
    /// checkpoint recorder, which flushes next) also sees those writes as completed.
    pub fn mark(&self, i: usize) {
        self.words[i / 64].fetch_or(1 << (i % 64), Ordering::Release);
    }

    #[must_use]
    pub fn contains(&self, i: usize) -> bool {
        self.words[i / 64].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }

    /// A copy of the set as it is now (the flush/record protocol takes this before flushing).
    #[must_use]
    pub fn snapshot(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    fn ranges_of(words: &[u64], len: usize) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < len {
            if words[i / 64] & (1 << (i % 64)) == 0 {
                i += 1;
                continue;
            }
            let start = i;
            while i < len && words[i / 64] & (1 << (i % 64)) != 0 {
                i += 1;
            }
            out.push((start, i));
        }
        out
    }
}

/// Load the done set of a checkpoint, or an empty one when the file does not exist.
pub fn load(path: &Path, key: &CheckpointKey) -> Result<DoneSet> {
    let done = DoneSet::new(key.items);
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => {
            return Err(MoverError::io(
                format!("reading checkpoint {}", path.display()),
                e,
            ))
        }
    };
    let disk: OnDisk = serde_json::from_str(&text).map_err(|e| {
        MoverError::InvalidPlan(format!(
            "checkpoint {} is not readable: {e}",
            path.display()
        ))
    })?;
    if disk.format != FORMAT || disk.version != VERSION {
        return Err(MoverError::InvalidPlan(format!(
            "checkpoint {} has format {} version {}, expected {FORMAT} version {VERSION}",
            path.display(),
            disk.format,
            disk.version
        )));
    }
    if disk.target != key.target {
        return Err(MoverError::InvalidPlan(format!(
            "checkpoint {} belongs to a copy into {}, not into {}; remove it to start over",
            path.display(),
            disk.target,
            key.target
        )));
    }
    if disk.disk_size != key.disk_size
        || disk.items != key.items
        || disk.plan != key.plan.to_string()
    {
        return Err(MoverError::InvalidPlan(format!(
            "checkpoint {} was made for another copy (disk size, extents or request size differ); \
             remove it to start over",
            path.display()
        )));
    }
    for (start, end) in disk.done {
        if start > end || end > key.items {
            return Err(MoverError::InvalidPlan(format!(
                "checkpoint {} is corrupt",
                path.display()
            )));
        }
        (start..end).for_each(|i| done.mark(i));
    }
    Ok(done)
}

/// Write the checkpoint atomically: temporary file, fsync, rename, fsync of the directory.
pub fn save(path: &Path, key: &CheckpointKey, done_words: &[u64]) -> Result<()> {
    let disk = OnDisk {
        format: FORMAT.into(),
        version: VERSION,
        source: key.source.clone(),
        target: key.target.clone(),
        disk_size: key.disk_size,
        items: key.items,
        plan: key.plan.to_string(),
        done: DoneSet::ranges_of(done_words, key.items),
    };
    let err = |e| MoverError::io(format!("writing checkpoint {}", path.display()), e);
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(err)?;
    f.write_all(&serde_json::to_vec(&disk).expect("checkpoint serialises"))
        .map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(items: usize) -> CheckpointKey {
        CheckpointKey {
            source: "a".into(),
            target: "b".into(),
            disk_size: 1 << 20,
            items,
            plan: u64::MAX - 7,
        }
    }

    #[test]
    fn round_trip_and_refusal_of_another_plan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.json");
        let set = DoneSet::new(200);
        for i in [0, 1, 2, 63, 64, 65, 199] {
            set.mark(i);
        }
        save(&path, &key(200), &set.snapshot()).unwrap();
        let back = load(&path, &key(200)).unwrap();
        assert!((0..200).all(|i| back.contains(i) == set.contains(i)));
        assert!(matches!(
            load(&path, &key(201)),
            Err(MoverError::InvalidPlan(_))
        ));
        let other_target = CheckpointKey {
            target: "c".into(),
            ..key(200)
        };
        let err = load(&path, &other_target).unwrap_err().to_string();
        assert!(err.contains("not into c"), "{err}");
        let missing = load(&dir.path().join("none.json"), &key(3)).unwrap();
        assert!(!missing.contains(0));
    }
}
