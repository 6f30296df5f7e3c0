//! Content hashes: BLAKE3, over several cores for large inputs. Signature
//! content hashes and base-model fingerprints hash whole tensors, where sha256
//! in Python took most of `extract`'s time.

/// Inputs at least this long are hashed with rayon: below it the thread
/// hand-off costs more than it saves (BLAKE3's docs suggest ~128 KiB).
pub const PARALLEL_MIN: usize = 128 << 10;

/// An incremental BLAKE3 hash.
#[derive(Default, Clone)]
pub struct Hasher(blake3::Hasher);

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `data`; the result is the same however the input is split.
    pub fn update(&mut self, data: &[u8]) {
        if data.len() >= PARALLEL_MIN {
            self.0.update_rayon(data);
        } else {
            self.0.update(data);
        }
    }

    /// The 32-byte digest as 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_blake3_reference_vectors() {
        // From the BLAKE3 specification: the empty input, and "abc".
        assert_eq!(
            Hasher::new().hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        let mut h = Hasher::new();
        h.update(b"abc");
        assert_eq!(
            h.hex(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }

    #[test]
    fn the_parallel_path_gives_the_same_digest_however_the_input_is_split() {
        let data: Vec<u8> = (0..3 * PARALLEL_MIN + 17)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut whole = Hasher::new();
        whole.update(&data);
        let mut pieces = Hasher::new();
        for part in data.chunks(1000) {
            pieces.update(part);
        }
        let mut reference = blake3::Hasher::new();
        reference.update(&data);
        assert_eq!(whole.hex(), pieces.hex());
        assert_eq!(whole.hex(), reference.finalize().to_hex().to_string());
    }
}
