//! The engine on local files: plans, zero runs, checkpoints, refused options.

use super::slot::zero_runs;
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
