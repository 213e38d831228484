//! Extent plans: which byte ranges of the disk a copy covers, and how.
//!
//! A plan is built and checked completely before the first byte is written: an explicit list
//! is sorted and merged, an extent past the end of the disk is refused, and every range is cut
//! into work items no larger than one request and aligned to the request grid, so that the
//! same disk always yields the same items (which is what makes checkpoints resumable).

use std::hash::{Hash, Hasher};

use crate::endpoint::{push_extent, Endpoint, Extent};
use crate::error::{MoverError, Result};

/// Largest range asked of an endpoint's allocation map at once (NBD block status lengths are
/// 32-bit).
const EXTENTS_WINDOW: u64 = 1 << 30;

/// Largest single zero command; a hole of many GiB becomes a few of these.
pub const MAX_ZERO_ITEM: u64 = 1 << 30;

/// Which ranges to copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanKind {
    /// The whole disk; every request is read and scanned for zeros.
    All,
    /// Only what the source's allocation map reports as data; runs that read as zeros are sent
    /// as zero commands without being read (or skipped when the target is known to be zero).
    Allocated,
    /// An explicit list of `(offset, length)`, e.g. the changed areas reported by CBT.
    Explicit(Vec<(u64, u64)>),
    /// The listed ranges are all the data the disk holds (e.g. vCenter's allocated areas for
    /// change ID `*`); everything outside them is zeroed on the target, so a target that held
    /// older data (a volume from an earlier, failed pass) ends up equal to the source.
    ExplicitZeroRest(Vec<(u64, u64)>),
}

/// One unit of work: a range to read and write, or a range to zero without reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkItem {
    pub offset: u64,
    pub length: u64,
    pub zero: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub disk_size: u64,
    pub items: Vec<WorkItem>,
}

impl Plan {
    /// Bytes the plan covers, data and zeros.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.items.iter().map(|i| i.length).sum()
    }

    /// A stable fingerprint of the plan, recorded in checkpoints.
    #[must_use]
    pub fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.disk_size.hash(&mut h);
        self.items.hash(&mut h);
        h.finish()
    }
}

/// Sort, merge overlapping and touching ranges, drop empty ones; refuse ranges past `size`.
pub fn normalise(ranges: &[(u64, u64)], size: u64) -> Result<Vec<(u64, u64)>> {
    let mut sorted: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(offset, length) in ranges {
        let end = offset.checked_add(length).ok_or_else(|| {
            MoverError::InvalidPlan(format!("extent ({offset}, {length}) overflows"))
        })?;
        if end > size {
            return Err(MoverError::InvalidPlan(format!(
                "extent ({offset}, {length}) ends at {end}, past the end of the disk ({size} bytes)"
            )));
        }
        if length > 0 {
            sorted.push((offset, end));
        }
    }
    sorted.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (start, end) in sorted {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    Ok(merged.into_iter().map(|(s, e)| (s, e - s)).collect())
}

/// Check the ranges of an explicit plan against a disk of `size` bytes, before anything is
/// opened for writing (the copy refuses a bad plan before it creates a target file).
pub fn check(kind: &PlanKind, size: u64) -> Result<()> {
    match kind {
        PlanKind::Explicit(ranges) | PlanKind::ExplicitZeroRest(ranges) => {
            normalise(ranges, size).map(drop)
        }
        PlanKind::All | PlanKind::Allocated => Ok(()),
    }
}

/// Cut `[offset, offset + length)` into items on the `request_size` grid.
fn push_range(items: &mut Vec<WorkItem>, offset: u64, length: u64, zero: bool, request_size: u64) {
    let end = offset + length;
    let mut pos = offset;
    let step = if zero { MAX_ZERO_ITEM } else { request_size };
    while pos < end {
        let next = ((pos / step) + 1) * step;
        let stop = next.min(end);
        items.push(WorkItem {
            offset: pos,
            length: stop - pos,
            zero,
        });
        pos = stop;
    }
}

/// The source's allocation map over the whole disk, window by window.
pub async fn allocation_map(source: &dyn Endpoint) -> Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    visit_allocation(source, |e| {
        push_extent(&mut out, e.offset, e.length, e.zero);
        true
    })
    .await?;
    Ok(out)
}

/// Hand `visit` the allocation map of `endpoint` over the whole disk, extent by extent in disk
/// order, asked window by window (two touching extents of one kind may come apart at a window
/// edge); `visit` answers false to stop there.
pub async fn visit_allocation(
    endpoint: &dyn Endpoint,
    mut visit: impl FnMut(Extent) -> bool,
) -> Result<()> {
    let size = endpoint.capabilities().size;
    let mut pos = 0;
    while pos < size {
        let len = EXTENTS_WINDOW.min(size - pos);
        let extents = endpoint.extents(pos, len).await?;
        let mut covered = pos;
        for e in extents {
            if e.offset != covered || e.length == 0 {
                return Err(MoverError::Protocol {
                    endpoint: endpoint.name().to_owned(),
                    message: format!("allocation map has a gap or overlap at {covered}"),
                });
            }
            let e = Extent {
                length: e.length.min(pos + len - e.offset),
                ..e
            };
            covered = e.end();
            if !visit(e) {
                return Ok(());
            }
            if covered >= pos + len {
                break;
            }
        }
        if covered == pos {
            return Err(MoverError::Protocol {
                endpoint: endpoint.name().to_owned(),
                message: format!("allocation map made no progress at {pos}"),
            });
        }
        pos = covered;
    }
    Ok(())
}

/// Build the plan for copying `source` with this kind of plan.
///
/// `skip_zero_runs`: the target is known to read as zeros already (a new image), so runs the
/// source reports as zero need no command at all.
pub async fn build(
    source: &dyn Endpoint,
    kind: &PlanKind,
    request_size: u64,
    skip_zero_runs: bool,
) -> Result<Plan> {
    let size = source.capabilities().size;
    let mut items = Vec::new();
    match kind {
        PlanKind::All => push_range(&mut items, 0, size, false, request_size),
        PlanKind::Explicit(ranges) => {
            for (offset, length) in normalise(ranges, size)? {
                push_range(&mut items, offset, length, false, request_size);
            }
        }
        PlanKind::ExplicitZeroRest(ranges) => {
            let mut pos = 0;
            for (offset, length) in normalise(ranges, size)? {
                if offset > pos && !skip_zero_runs {
                    push_range(&mut items, pos, offset - pos, true, request_size);
                }
                push_range(&mut items, offset, length, false, request_size);
                pos = offset + length;
            }
            if pos < size && !skip_zero_runs {
                push_range(&mut items, pos, size - pos, true, request_size);
            }
        }
        PlanKind::Allocated => {
            for e in allocation_map(source).await? {
                if e.zero && skip_zero_runs {
                    continue;
                }
                push_range(&mut items, e.offset, e.length, e.zero, request_size);
            }
        }
    }
    Ok(Plan {
        disk_size: size,
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_sorts_and_merges() {
        let got = normalise(&[(100, 50), (0, 10), (10, 5), (120, 100), (500, 0)], 1000).unwrap();
        assert_eq!(got, vec![(0, 15), (100, 120)]);
    }

    #[test]
    fn normalise_refuses_past_end_and_overflow() {
        assert!(matches!(
            normalise(&[(990, 11)], 1000),
            Err(MoverError::InvalidPlan(_))
        ));
        assert!(matches!(
            normalise(&[(u64::MAX, 2)], 1000),
            Err(MoverError::InvalidPlan(_))
        ));
        assert_eq!(normalise(&[(990, 10)], 1000).unwrap(), vec![(990, 10)]);
    }

    #[test]
    fn ranges_are_cut_on_the_request_grid() {
        let mut items = Vec::new();
        push_range(&mut items, 100, 300, false, 128);
        let cuts: Vec<(u64, u64)> = items.iter().map(|i| (i.offset, i.length)).collect();
        assert_eq!(cuts, vec![(100, 28), (128, 128), (256, 128), (384, 16)]);
    }

    #[test]
    fn zero_runs_are_cut_coarsely() {
        let mut items = Vec::new();
        push_range(&mut items, 0, 3 * MAX_ZERO_ITEM, true, 128);
        assert_eq!(items.len(), 3);
        assert!(items.iter().all(|i| i.zero));
    }
}
