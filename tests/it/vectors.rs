//! The dm-thin test vectors in `testdata/dm-thin/` are what their README says: the four
//! `thin_restore` images rebuild byte for byte from their XML, all six match the README's
//! SHA-256 sums, pass `thin_check`, and `thin_dump` prints their XML (`regenerate.sh`).

use thinpool_tests::{require_tools, run, testdata_dir, text};

#[test]
fn vectors_match_their_readme() {
    if !require_tools(&[
        "thin_restore",
        "thin_check",
        "thin_dump",
        "gunzip",
        "sha256sum",
    ]) {
        return;
    }
    let out = run(&mut std::process::Command::new(
        testdata_dir().join("regenerate.sh"),
    ));
    let said = text(&out.stdout);
    assert!(out.status.success(), "regenerate.sh failed:\n{said}");
    assert_eq!(
        said.lines().filter(|l| l.ends_with(": ok")).count(),
        6,
        "{said}"
    );
}
