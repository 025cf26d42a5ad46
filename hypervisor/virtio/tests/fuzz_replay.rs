//! The fuzz target's logic under plain `cargo test` (CI runs stable, without cargo-fuzz):
//! the hand-made seeds, the committed corpus, and pseudo-random inputs derived from them all
//! go through `hv_virtio::fuzz::run`, the function the cargo-fuzz target calls.
//!
//! `HV_VIRTIO_FUZZ_CASES` sets the number of pseudo-random cases (default 20000);
//! `HV_VIRTIO_WRITE_SEEDS=DIR` writes the seeds as corpus files into DIR.

use hv_virtio::fuzz::{self, HEADER, MEM_SIZE};

/// xorshift64*: deterministic, good enough to spread mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

fn corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/virtio_transport")
}

#[test]
fn seeds_run_clean() {
    for (name, input) in fuzz::seeds() {
        let o = fuzz::run(&input);
        match name {
            "transport_abuse" => assert!(o.broken, "{name}: {o:?}"),
            _ => assert!(!o.broken, "{name}: {o:?}"),
        }
    }
}

#[test]
fn committed_corpus_replays() {
    let Ok(dir) = std::fs::read_dir(corpus_dir()) else {
        return;
    };
    let mut n = 0;
    for entry in dir {
        let path = entry.unwrap().path();
        let _ = fuzz::run(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n >= fuzz::seeds().len(), "corpus has {n} files");
}

#[test]
fn pseudo_random_inputs_never_panic() {
    let cases: usize = std::env::var("HV_VIRTIO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seeds: Vec<Vec<u8>> = fuzz::seeds().into_iter().map(|(_, s)| s).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut broken = 0;
    for _ in 0..cases {
        let input = if rng.below(4) == 0 {
            // Short, unstructured input.
            let len = rng.below(HEADER + 64);
            (0..len).map(|_| rng.byte()).collect()
        } else {
            let mut v = seeds[rng.below(seeds.len())].clone();
            // Flip bytes, mostly in the rings and buffers.
            for _ in 0..1 + rng.below(16) {
                let at = HEADER + rng.below(MEM_SIZE);
                v[at] = rng.byte();
            }
            for _ in 0..rng.below(12) {
                v.extend_from_slice(&[rng.byte(), rng.byte(), rng.byte(), rng.byte()]);
            }
            v[0] = rng.byte();
            v[1] = rng.byte();
            v
        };
        broken += usize::from(fuzz::run(&input).broken);
    }
    // Sanity: mutations do reach the checks.
    assert!(broken > 0);
}

#[test]
fn write_seeds_when_asked() {
    let Ok(dir) = std::env::var("HV_VIRTIO_WRITE_SEEDS") else {
        return;
    };
    std::fs::create_dir_all(&dir).unwrap();
    for (name, input) in fuzz::seeds() {
        std::fs::write(std::path::Path::new(&dir).join(name), input).unwrap();
    }
}
