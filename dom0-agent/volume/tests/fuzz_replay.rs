//! Replays the `metadata` fuzz target's seed corpus (`fuzz/corpus/metadata`), one-byte changes
//! of each seed at up to 512 places, and pseudo-random inputs, through the same body the
//! cargo-fuzz target runs (`fuzz/body/metadata.rs`), so `cargo test` exercises it without
//! cargo-fuzz.

#[path = "../fuzz/body/metadata.rs"]
mod body;

#[test]
fn metadata_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/metadata");
    let mut seeds = 0;
    for e in std::fs::read_dir(&dir).expect("the seed corpus is in the repository") {
        let data = std::fs::read(e.expect("readable").path()).expect("readable");
        body::metadata(&data);
        for k in (1..data.len()).step_by((data.len() / 512).max(1)) {
            body::metadata(&data[..k]);
            let mut m = data.clone();
            m[k] ^= 0xff;
            body::metadata(&m);
        }
        seeds += 1;
    }
    assert!(seeds >= 5, "{seeds} seeds in {}", dir.display());
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..3000 {
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let len = usize::try_from(next() % 700).expect("small");
        let data: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
        body::metadata(&data);
    }
}
