//! The engine on local files: plans, zero runs, checkpoints, refused options.

use super::slot::{zero_runs, ZeroMap};
use super::*;
use crate::endpoint::{file::FileEndpoint, Access};

#[test]
fn zero_scan() {
    let mut b = vec![0u8; 1 << 20];
    assert!(is_zero(&b));
    assert!(is_zero(&b[3..1001]));
    b[(1 << 20) - 1] = 1;
    assert!(!is_zero(&b));
    b[(1 << 20) - 1] = 0;
    b[1] = 1;
    assert!(!is_zero(&b[1..]));
    assert!(is_zero(&b[2..]));
}

#[test]
fn zero_runs_are_whole_aligned_blocks() {
    let mut b = vec![0u8; 6 * 4096];
    b[100] = 1; // block 0 (unaligned start below) holds data
    b[3 * 4096 + 5] = 1; // block 3 holds data
                         // Read at an offset 512 bytes past a block boundary: the first and last pieces are
                         // partial blocks and are never zero runs.
    let runs = zero_runs(4096 + 512, &b);
    let aligned = |o: u64| usize::try_from(o - (4096 + 512)).unwrap();
    assert_eq!(
        runs,
        vec![
            (aligned(2 * 4096), aligned(4 * 4096)),
            (aligned(5 * 4096), aligned(7 * 4096)),
        ]
    );
    assert!(zero_runs(0, &[1u8; 8192]).is_empty());
}

async fn sparse_source(dir: &std::path::Path) -> (String, Vec<u8>) {
    let path = dir.join("src.raw").to_str().unwrap().to_owned();
    let size = 16 << 20;
    let src = FileEndpoint::open(&path, Access::Write { create_size: size })
        .await
        .unwrap();
    let mut expect = vec![0u8; size as usize];
    for (k, off) in [0u64, 5 << 20, (15 << 20) + 4096].into_iter().enumerate() {
        let data: Vec<u8> = (0..300_000u32).map(|x| (x as u8) ^ (k as u8 + 1)).collect();
        let end = (off as usize + data.len()).min(size as usize);
        expect[off as usize..end].copy_from_slice(&data[..end - off as usize]);
        src.write(off, data[..end - off as usize].to_vec())
            .await
            .unwrap();
    }
    (path, expect)
}

async fn run(src: &str, dst: &str, kind: PlanKind, opts: &CopyOptions) -> Result<ProgressSnapshot> {
    let s: Arc<dyn Endpoint> = Arc::new(FileEndpoint::open(src, Access::Read).await?);
    let size = s.capabilities().size;
    let d: Arc<dyn Endpoint> =
        Arc::new(FileEndpoint::open(dst, Access::Write { create_size: size }).await?);
    copy(s, d, &kind, opts, Arc::default(), Arc::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocated_copy_moves_only_data() {
    let dir = tempfile::tempdir().unwrap();
    let (src, expect) = sparse_source(dir.path()).await;
    let dst = dir.path().join("dst.raw").to_str().unwrap().to_owned();
    let opts = CopyOptions {
        request_size: 1 << 16,
        ..CopyOptions::default()
    };
    let snap = run(&src, &dst, PlanKind::Allocated, &opts).await.unwrap();
    assert_eq!(std::fs::read(&dst).unwrap(), expect);
    assert!(
        snap.bytes_read < 2 << 20,
        "read {} bytes of a mostly sparse disk",
        snap.bytes_read
    );
    assert_eq!(snap.bytes_done(), snap.bytes_planned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_zero_rest_overwrites_stale_target_data() {
    let dir = tempfile::tempdir().unwrap();
    let (src, expect) = sparse_source(dir.path()).await;
    let dst = dir.path().join("stale.raw");
    std::fs::write(&dst, vec![0xa5u8; expect.len()]).unwrap();
    let dst = dst.to_str().unwrap().to_owned();
    let data = vec![
        (0, 300_000),
        (5 << 20, 300_000),
        ((15 << 20) + 4096, (1 << 20) - 4096),
    ];
    let opts = CopyOptions {
        request_size: 1 << 16,
        ..CopyOptions::default()
    };
    let snap = run(&src, &dst, PlanKind::ExplicitZeroRest(data), &opts)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dst).unwrap(), expect);
    assert_eq!(snap.bytes_done(), expect.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_extents_past_the_end_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = sparse_source(dir.path()).await;
    let dst = dir.path().join("dst.raw").to_str().unwrap().to_owned();
    let err = run(
        &src,
        &dst,
        PlanKind::Explicit(vec![(0, 4096), (16 << 20, 1)]),
        &CopyOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, MoverError::InvalidPlan(_)), "{err}");
    assert!(std::fs::read(&dst).unwrap().iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_resume_skips_done_items() {
    let dir = tempfile::tempdir().unwrap();
    let (src, expect) = sparse_source(dir.path()).await;
    let dst = dir.path().join("dst.raw").to_str().unwrap().to_owned();
    let cp = dir.path().join("cp.json");
    let opts = CopyOptions {
        request_size: 1 << 16,
        checkpoint: Some(cp.clone()),
        ..CopyOptions::default()
    };
    let first = run(&src, &dst, PlanKind::All, &opts).await.unwrap();
    assert_eq!(first.bytes_resumed, 0);
    let again = run(&src, &dst, PlanKind::All, &opts).await.unwrap();
    assert_eq!(again.bytes_resumed, again.bytes_planned);
    assert_eq!(again.bytes_read, 0);
    assert_eq!(std::fs::read(&dst).unwrap(), expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = sparse_source(dir.path()).await;
    let dst = dir.path().join("dst.raw").to_str().unwrap().to_owned();
    let opts = CopyOptions {
        request_size: 3000,
        ..CopyOptions::default()
    };
    assert!(matches!(
        run(&src, &dst, PlanKind::All, &opts).await,
        Err(MoverError::InvalidPlan(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_known_zeros_are_the_targets_zero_runs_up_to_a_limit() {
    let dir = tempfile::tempdir().unwrap();
    // Holes at 0-2, 4-5 and 6-16 MiB around the stale data.
    let dst = stale_target(dir.path(), 16 << 20, &[(2, 4), (5, 6)]);
    let target = FileEndpoint::open(&dst, Access::Read).await.unwrap();
    let runs = [(0, 2 << 20), (4 << 20, 5 << 20), (6 << 20, 16 << 20)];
    assert_eq!(
        ZeroMap::of(&target, 10).await.unwrap(),
        ZeroMap(runs.to_vec())
    );
    assert_eq!(
        ZeroMap::of(&target, 2).await.unwrap(),
        ZeroMap(runs[..2].to_vec())
    );
}

#[test]
fn known_zeros_leave_gaps_to_zero() {
    let map = ZeroMap(vec![(10, 20), (30, 40), (40, 50), (70, 80)]);
    assert_eq!(
        map.gaps(0, 100),
        vec![(0, 10), (20, 10), (50, 20), (80, 20)]
    );
    assert_eq!(map.gaps(12, 6), vec![]);
    assert_eq!(map.gaps(15, 20), vec![(20, 10)]);
    assert_eq!(map.gaps(45, 30), vec![(50, 20)]);
    assert_eq!(map.gaps(80, 5), vec![(80, 5)]);
    assert_eq!(ZeroMap::default().gaps(7, 3), vec![(7, 3)]);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Write,
    Zero(u64, u64),
    Flush,
}

/// What a [`Probe`] saw, shared by the handles it hands out.
#[derive(Default)]
struct Seen {
    /// Writes and zero commands as they completed, flushes as they began.
    events: Mutex<Vec<Event>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

impl Seen {
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn zeroed(&self) -> Vec<(u64, u64)> {
        let zeroed = self.events().into_iter().filter_map(|e| match e {
            Event::Zero(o, l) => Some((o, l)),
            _ => None,
        });
        zeroed.collect()
    }
}

/// A local file as a target, with the capabilities a test gives it, recording the writes, zero
/// commands, flushes and requests in flight it sees; each write takes at least 2 ms, so that a
/// copy of a few MiB lasts long enough for a flush to come during it.
struct Probe {
    inner: Arc<dyn Endpoint>,
    caps: crate::endpoint::Capabilities,
    seen: Arc<Seen>,
}

impl Probe {
    /// Copy the file `src` into a probe over the file `dst` (created as needed); what the copy
    /// reported, and what the probe saw.
    async fn copy(
        src: &str,
        dst: &str,
        flush_ahead: bool,
        kind: PlanKind,
        opts: &CopyOptions,
    ) -> (ProgressSnapshot, Arc<Seen>) {
        let s: Arc<dyn Endpoint> = Arc::new(FileEndpoint::open(src, Access::Read).await.unwrap());
        let size = s.capabilities().size;
        let write = Access::Write { create_size: size };
        let inner: Arc<dyn Endpoint> = Arc::new(FileEndpoint::open(dst, write).await.unwrap());
        let caps = crate::endpoint::Capabilities {
            flush_ahead,
            ..inner.capabilities().clone()
        };
        let seen = Arc::new(Seen::default());
        let d = Arc::new(Self {
            inner,
            caps,
            seen: Arc::clone(&seen),
        });
        let snap = copy(s, d, &kind, opts, Arc::default(), Arc::default())
            .await
            .unwrap();
        (snap, seen)
    }

    async fn counted<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let now = self.seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.seen.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let out = work.await;
        self.seen.in_flight.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

#[async_trait::async_trait]
impl Endpoint for Probe {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> &crate::endpoint::Capabilities {
        &self.caps
    }

    async fn another(&self) -> Result<Arc<dyn Endpoint>> {
        Ok(Arc::new(Self {
            inner: self.inner.another().await?,
            caps: self.caps.clone(),
            seen: Arc::clone(&self.seen),
        }))
    }

    async fn read(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        self.counted(self.inner.read(offset, buf)).await
    }

    async fn write(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>> {
        let slow = async {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            self.inner.write(offset, buf).await
        };
        let buf = self.counted(slow).await?;
        self.seen.events.lock().unwrap().push(Event::Write);
        Ok(buf)
    }

    async fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.counted(self.inner.write_zeroes(offset, length))
            .await?;
        let zeroed = Event::Zero(offset, length);
        self.seen.events.lock().unwrap().push(zeroed);
        Ok(())
    }

    async fn extents(&self, offset: u64, length: u64) -> Result<Vec<crate::endpoint::Extent>> {
        self.inner.extents(offset, length).await
    }

    async fn flush(&self) -> Result<()> {
        self.seen.events.lock().unwrap().push(Event::Flush);
        self.inner.flush().await
    }
}

/// A target that is a hole except for stale data at `stale` (MiB ranges).
fn stale_target(dir: &std::path::Path, size: u64, stale: &[(u64, u64)]) -> String {
    use std::os::unix::fs::FileExt;
    let path = dir.join("stale.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    for &(start, end) in stale {
        f.write_all_at(&vec![0xa5u8; ((end - start) << 20) as usize], start << 20)
            .unwrap();
    }
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_commands_go_only_where_the_target_does_not_read_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let (src, expect) = sparse_source(dir.path()).await;
    // Stale data in two holes of the source, and under the source's data at 5 MiB.
    let stale = [(2, 4), (5, 6), (10, 11)];
    let dst = stale_target(dir.path(), expect.len() as u64, &stale);
    let opts = CopyOptions {
        request_size: 1 << 16,
        ..CopyOptions::default()
    };
    let (snap, seen) = Probe::copy(&src, &dst, false, PlanKind::Allocated, &opts).await;
    assert_eq!(std::fs::read(&dst).unwrap(), expect);
    let zeroed = seen.zeroed();
    let inside =
        |&(o, l): &(u64, u64)| stale.iter().any(|&(s, e)| o >= s << 20 && o + l <= e << 20);
    assert!(
        zeroed.iter().all(inside),
        "zeroed outside the stale data: {zeroed:?}"
    );
    // The stale MiB at 5 MiB holds the source's data up to 300,000 bytes in; the rest of
    // its page-rounded extent (up to 303,104) is written as data.
    let zeroed_bytes: u64 = zeroed.iter().map(|z| z.1).sum();
    assert_eq!(zeroed_bytes, (3 << 20) + (1 << 20) - 303_104);
    // What the copy reports is what it reported before it knew the target's zeros.
    assert_eq!(snap.bytes_planned, expect.len() as u64);
    assert_eq!(snap.bytes_done(), snap.bytes_planned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_flushed_ahead_is_flushed_as_the_copy_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (src, expect) = sparse_source(dir.path()).await;
    for (flush_ahead, every, ahead) in [
        (true, 64 << 10, true),
        (true, 0, false),
        (false, 64 << 10, false),
    ] {
        let dst = dir.path().join("dst.raw");
        let _ = std::fs::remove_file(&dst);
        let dst = dst.to_str().unwrap();
        let opts = CopyOptions {
            request_size: 1 << 16,
            flush_ahead: every,
            ..CopyOptions::default()
        };
        let (_, seen) = Probe::copy(&src, dst, flush_ahead, PlanKind::Allocated, &opts).await;
        assert_eq!(std::fs::read(dst).unwrap(), expect);
        let events = seen.events();
        let last_write = events.iter().rposition(|e| *e == Event::Write).unwrap();
        let flushes_before = events[..last_write]
            .iter()
            .filter(|e| **e == Event::Flush)
            .count();
        // However many came before, the last flush follows every write.
        assert_eq!(events.last(), Some(&Event::Flush), "{events:?}");
        assert_eq!(
            flushes_before > 0,
            ahead,
            "flush_ahead {flush_ahead}, every {every}: {events:?}"
        );
        if !ahead {
            assert_eq!(events.iter().filter(|e| **e == Event::Flush).count(), 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_budget_bounds_the_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (src, expect) = sparse_source(dir.path()).await;
    let dst = dir.path().join("dst.raw");
    let dst = dst.to_str().unwrap();
    let opts = CopyOptions {
        connections: 1,
        requests: 16,
        request_size: 1 << 16,
        buffer_budget: 2 << 16,
        ..CopyOptions::default()
    };
    let (_, seen) = Probe::copy(&src, dst, false, PlanKind::All, &opts).await;
    assert_eq!(std::fs::read(dst).unwrap(), expect);
    let most = seen.most_in_flight.load(Ordering::SeqCst);
    assert!((1..=2).contains(&most), "{most} requests in flight");
}
