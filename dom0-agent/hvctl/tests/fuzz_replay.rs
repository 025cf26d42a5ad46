//! Replays the `nbd` fuzz target's seed corpus (`fuzz/corpus/nbd`), one-byte changes of each
//! seed, and pseudo-random inputs, through the body the cargo-fuzz target runs
//! (`fuzz/body/nbd.rs`) over the server's own protocol module, so `cargo test` exercises it
//! without cargo-fuzz.

#[allow(dead_code)] // The server's constants that only the session code uses.
#[path = "../src/nbd/proto.rs"]
mod proto;

#[path = "../fuzz/body/nbd.rs"]
mod body;

#[test]
fn nbd_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/nbd");
    let mut seeds = 0;
    for e in std::fs::read_dir(&dir).expect("the seed corpus is in the repository") {
        let data = std::fs::read(e.expect("readable").path()).expect("readable");
        body::nbd(&data);
        for k in 0..data.len() {
            body::nbd(&data[..k]);
            let mut m = data.clone();
            m[k] ^= 0xff;
            body::nbd(&m);
        }
        seeds += 1;
    }
    assert!(seeds >= 4, "{seeds} seeds in {}", dir.display());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..5000 {
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let len = usize::try_from(next() % 200).expect("small");
        let data: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
        body::nbd(&data);
    }
}
