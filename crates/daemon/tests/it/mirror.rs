//! `thinpool_control::{PoolStatus, VolumeInfo}` against the engine's types of the same names.

use thinpool_engine::{PoolMode, PoolStatus, VolumeInfo, VolumeKind};

fn status(mode: PoolMode, held_root: Option<u64>, flags: bool) -> PoolStatus {
    PoolStatus {
        transaction_id: 7,
        used_metadata_blocks: 120,
        total_metadata_blocks: 1024,
        used_data_blocks: 33,
        total_data_blocks: 1000,
        block_size: 65536,
        held_root,
        mode,
        needs_check: flags,
        error_if_no_space: flags,
        discard_passdown: !flags,
        metadata_low_watermark: 256,
        data_path: "/r/pool/data".into(),
        metadata_path: "/r/pool/metadata".into(),
        volumes: 3,
        snapshots: 1,
        failure: flags.then(|| "host file system full: write of /r/pool/data failed".into()),
    }
}

fn json<T: serde::Serialize>(v: &T, pretty: bool) -> String {
    if pretty {
        serde_json::to_string_pretty(v).unwrap()
    } else {
        serde_json::to_string(v).unwrap()
    }
}

/// Engine value → JSON → control value → JSON: the two texts are equal, compact and pretty
/// (the CLI's `--json` is pretty).
fn same_json<E: serde::Serialize, C: serde::Serialize + serde::de::DeserializeOwned>(e: &E) -> C {
    for pretty in [false, true] {
        let theirs = json(e, pretty);
        let c: C = serde_json::from_str(&theirs).expect("the control type reads the engine's JSON");
        assert_eq!(json(&c, pretty), theirs);
    }
    serde_json::from_str(&json(e, false)).unwrap()
}

#[test]
fn pool_status_mirrors_the_engine() {
    for mode in [
        PoolMode::Write,
        PoolMode::OutOfDataSpace,
        PoolMode::ReadOnly,
        PoolMode::Fail,
    ] {
        for (held, flags) in [(None, false), (Some(99), true)] {
            let e = status(mode, held, flags);
            let c: thinpool_control::PoolStatus = same_json(&e);
            assert_eq!(c.kernel_line(), e.kernel_line(), "{mode:?}");
        }
    }
}

#[test]
fn volume_info_mirrors_the_engine() {
    let thin = VolumeInfo {
        name: "base".into(),
        thin_id: 1,
        size: 10 << 30,
        kind: VolumeKind::Thin,
        parent: None,
        created: 1_700_000_000,
        mapped_blocks: 16,
        highest_mapped_block: Some(15),
        labels: Default::default(),
    };
    let snap = VolumeInfo {
        name: "snap".into(),
        thin_id: 2,
        kind: VolumeKind::Snapshot,
        parent: Some("base".into()),
        highest_mapped_block: None,
        labels: [("layer.key".to_string(), "sha256:abc".to_string())].into(),
        ..thin.clone()
    };
    let c: Vec<thinpool_control::VolumeInfo> = same_json(&vec![thin, snap]);
    assert!(c[0].labels.is_empty());
    assert_eq!(c[1].labels["layer.key"], "sha256:abc");
    assert_eq!(c[1].kind, thinpool_control::VolumeKind::Snapshot);
    assert_eq!(c[1].parent.as_deref(), Some("base"));
}
