//! Hashes: BLAKE3 content hashes, over several cores for large inputs (signature
//! content hashes hash whole tensors, where sha256 in Python took most of
//! `extract`'s time), and the XXH3 tensor digests of base-model fingerprints.

use crate::dtype::DType;

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

    /// Add the float32 form of `data`: raw little-endian elements of `dtype`
    /// (F16 and BF16 widened exactly, in cache-sized blocks over every core).
    /// Returns whether every value is finite. Signature content hashes are
    /// defined over float32 values however a delta is stored.
    pub fn update_widened(&mut self, data: &[u8], dtype: DType) -> bool {
        use rayon::prelude::*;
        let size = dtype.size();
        let mut wide = vec![0u32; WIDEN_BLOCK.min(data.len() / size)];
        let mut finite = true;
        for block in data.chunks(WIDEN_BLOCK * size) {
            let out = &mut wide[..block.len() / size];
            let simd = crate::arch::selected_or_scalar();
            let widen = |(src, dst): (&[u8], &mut [u32])| {
                simd.run(
                    #[inline(always)]
                    || widen_bits(src, dtype, dst),
                )
            };
            finite &= if block.len() >= PARALLEL_MIN {
                let part = CHUNK_ELEMENTS * size;
                let parts = block
                    .par_chunks(part)
                    .zip(out.par_chunks_mut(CHUNK_ELEMENTS));
                parts.map(widen).reduce(|| true, |a, b| a & b)
            } else {
                widen((block, out))
            };
            self.update(bytes_of_u32(out));
        }
        finite
    }

    /// Add `data` as stored (raw little-endian elements of `dtype`) and return
    /// whether every value is finite: the check a streamed signature's dense
    /// deltas need, in the pass that hashes them (content hashes of the
    /// `tensors-blake3` form are over stored bytes, not widened values).
    pub fn update_finite(&mut self, data: &[u8], dtype: DType) -> bool {
        use rayon::prelude::*;
        let simd = crate::arch::selected_or_scalar();
        let check = |part: &[u8]| {
            simd.run(
                #[inline(always)]
                || all_finite(part, dtype),
            )
        };
        let finite = if data.len() >= PARALLEL_MIN {
            let part = CHUNK_ELEMENTS * dtype.size();
            data.par_chunks(part)
                .map(check)
                .reduce(|| true, |a, b| a & b)
        } else {
            check(data)
        };
        self.update(data);
        finite
    }

    /// The 32-byte digest as 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

/// Elements widened at a time by [`Hasher::update_widened`] (4 MiB of f32), and
/// per parallel task.
const WIDEN_BLOCK: usize = 1 << 20;
const CHUNK_ELEMENTS: usize = 1 << 16;

/// Widen raw elements of `dtype` to f32 bit patterns; true when all are finite
/// (no f32 pattern with an all-ones exponent). Element loops without branches,
/// so that they vectorize (under the SIMD path's target features: inlined).
#[inline(always)]
fn widen_bits(src: &[u8], dtype: DType, dst: &mut [u32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    let mut bad = 0u32;
    match dtype {
        DType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                bad |= u32::from(*d & EXP == EXP);
            }
        }
        DType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = u32::from(u16::from_le_bytes([s[0], s[1]])) << 16;
            }
            bad = dst.iter().fold(0, |b, d| b | u32::from(d & EXP == EXP));
        }
        DType::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                let h = half::f16::from_bits(u16::from_le_bytes([s[0], s[1]]));
                *d = h.to_f32().to_bits();
                bad |= u32::from(*d & EXP == EXP);
            }
        }
    }
    bad == 0
}

/// Whether no element of `src` (raw little-endian elements of `dtype`) has an
/// all-ones exponent (NaN or Inf); a branch-free fold, so that it vectorizes.
#[inline(always)]
fn all_finite(src: &[u8], dtype: DType) -> bool {
    let bad = match dtype {
        DType::F32 => src.chunks_exact(4).fold(0u32, |b, s| {
            let v = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            b | u32::from(v & 0x7f80_0000 == 0x7f80_0000)
        }),
        DType::BF16 | DType::F16 => {
            let exp = if dtype == DType::BF16 { 0x7f80 } else { 0x7c00 };
            src.chunks_exact(2).fold(0u32, |b, s| {
                b | u32::from(u16::from_le_bytes([s[0], s[1]]) & exp == exp)
            })
        }
    };
    bad == 0
}

fn bytes_of_u32(x: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

/// Elements per block of a [`tensor_digest`] (the projection's reduction block,
/// so it can hash each block in the pass that reads it).
pub const DIGEST_BLOCK: usize = 4096;

/// A tensor's digest for the base-model fingerprint: XXH3-128 over the XXH3-128
/// digests (16 bytes each, little-endian) of its blocks of [`DIGEST_BLOCK`]
/// elements in order, the last block possibly shorter. Blocks hash on any thread,
/// and XXH3 is several times faster than BLAKE3: a fingerprint identifies a base
/// model, it guards nothing against an adversary, so speed wins here (content
/// hashes stay BLAKE3). `bytes` holds the elements of `elem_size` bytes each.
pub fn tensor_digest(bytes: &[u8], elem_size: usize) -> [u8; 16] {
    use rayon::prelude::*;
    let block = DIGEST_BLOCK * elem_size;
    let blocks: Vec<[u8; 16]> = if bytes.len() >= PARALLEL_MIN {
        bytes.par_chunks(block).map(block_digest).collect()
    } else {
        bytes.chunks(block).map(block_digest).collect()
    };
    digest_of_blocks(&blocks)
}

/// The digest of one block of a [`tensor_digest`].
pub fn block_digest(block: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(block).to_le_bytes()
}

/// A [`tensor_digest`] from its blocks' digests, in order.
pub fn digest_of_blocks(blocks: &[[u8; 16]]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(blocks.as_flattened()).to_le_bytes()
}

/// The CRC-32 (zlib's, IEEE polynomial) of `data`: what undo records keep of
/// each patched tensor, to tell a file changed since (not tampering).
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// A digest as lowercase hex digits.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_digest_is_xxh3_over_its_blocks_digests() {
        // XXH3-128 of the empty input, from the xxHash reference (XXH3_128bits).
        assert_eq!(
            hex(&tensor_digest(&[], 4)),
            hex(&0x99aa06d3014798d86001c324468d497f_u128.to_le_bytes())
        );
        for (len, size) in [
            (1, 4),
            (DIGEST_BLOCK, 4),
            (3 * DIGEST_BLOCK + 5, 2),
            (40_000, 4),
        ] {
            let data: Vec<u8> = (0..len * size).map(|i| (i * 7 % 253) as u8).collect();
            let mut concat = Vec::new();
            for b in data.chunks(DIGEST_BLOCK * size) {
                concat.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(b).to_le_bytes());
            }
            let want = xxhash_rust::xxh3::xxh3_128(&concat).to_le_bytes();
            assert_eq!(
                tensor_digest(&data, size),
                want,
                "{len} elements of {size} bytes"
            );
        }
    }

    /// `n` exact test values (multiples of 1/8 in ±32) as raw little-endian `dtype`.
    fn stored_values(n: usize, dtype: DType) -> Vec<u8> {
        use half::{bf16, f16};
        let vals = (0..n).map(|i| ((i % 509) as f32 - 254.0) / 8.0);
        match dtype {
            DType::F32 => vals.flat_map(f32::to_le_bytes).collect(),
            DType::BF16 => vals.flat_map(|v| bf16::from_f32(v).to_le_bytes()).collect(),
            DType::F16 => vals.flat_map(|v| f16::from_f32(v).to_le_bytes()).collect(),
        }
    }

    #[test]
    fn widened_updates_hash_the_float32_values_and_find_non_finite_ones() {
        let n = 3 * WIDEN_BLOCK / 2 + 5; // two blocks, the last partial; parallel path
        let mut want = Hasher::new();
        want.update(&stored_values(n, DType::F32));
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let raw = stored_values(n, dtype);
            let mut got = Hasher::new();
            assert!(got.update_widened(&raw, dtype), "{dtype:?}");
            assert_eq!(got.hex(), want.hex(), "{dtype:?}");
            let mut bad = raw.clone();
            let at = bad.len() - dtype.size(); // the last value: +Inf or NaN
            bad[at..].copy_from_slice(&[0x00, 0x00, 0x80, 0x7f][4 - dtype.size()..]);
            if dtype == DType::F16 {
                bad[at..].copy_from_slice(&[0x00, 0x7c]);
            }
            assert!(!Hasher::new().update_widened(&bad, dtype), "{dtype:?}");
        }
    }

    #[test]
    fn finite_updates_hash_the_stored_bytes_and_find_non_finite_ones() {
        let n = 3 * CHUNK_ELEMENTS + 5; // several parallel parts, the last partial
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let raw = stored_values(n, dtype);
            let mut want = Hasher::new();
            want.update(&raw);
            let mut got = Hasher::new();
            assert!(got.update_finite(&raw, dtype), "{dtype:?}");
            assert_eq!(got.hex(), want.hex(), "{dtype:?}");
            // A NaN or Inf anywhere, in the parallel path and the short one.
            let inf: &[u8] = match dtype {
                DType::F32 => &[0x00, 0x00, 0x80, 0x7f],
                DType::BF16 => &[0x80, 0x7f],
                DType::F16 => &[0x00, 0x7c],
            };
            let nan: &[u8] = match dtype {
                DType::F32 => &[0x01, 0x00, 0xc0, 0xff],
                DType::BF16 => &[0xc1, 0xff],
                DType::F16 => &[0x01, 0xfe],
            };
            for (at, bad_value) in [(0, inf), (n / 2, nan), (n - 1, inf)] {
                let mut bad = raw.clone();
                let byte = at * dtype.size();
                bad[byte..byte + dtype.size()].copy_from_slice(bad_value);
                assert!(
                    !Hasher::new().update_finite(&bad, dtype),
                    "{dtype:?} at {at}"
                );
                let short = &bad[byte - byte % 64..(byte + 64).min(bad.len())];
                assert!(
                    !Hasher::new().update_finite(short, dtype),
                    "{dtype:?} short"
                );
            }
        }
    }

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
