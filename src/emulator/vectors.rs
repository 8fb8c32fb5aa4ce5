//! The emulator's embedding function: a deterministic stand-in for a real model.
//!
//! It owns only the arithmetic from text to vector. A hashing-trick bag of words (lowercased
//! alphanumeric words, plus word bigrams at half weight) is summed into `dims` buckets, each
//! feature with a sign, then L2-normalised, so texts that share words land near each other and
//! tests can compare a stored vector bit for bit with [`embedding`]. The hash is FNV-1a, fixed
//! forever: a std `DefaultHasher` may change between Rust releases, and vectors written by one
//! build must be reproducible by the next.

/// Deterministic embedding of `text` with `dims` components (see the module doc).
///
/// Text without any word (empty, punctuation only) — or whose features happen to cancel out —
/// gets a fixed unit vector, so the result is always finite, of length `dims`, and of norm 1
/// (for `dims > 0`).
pub fn embedding(text: &str, dims: usize) -> Vec<f32> {
    if dims == 0 {
        return Vec::new();
    }
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .collect();

    // Accumulate in f64 so the order of summation barely matters and the final rounding to f32
    // happens once.
    let mut sums = vec![0f64; dims];
    let mut add = |feature: &[&[u8]], weight: f64| {
        let hash = fnv1a(feature);
        // The low bits pick the bucket, the top bit the sign: independent enough for a hash
        // whose output bits are all mixed.
        let bucket = (hash % dims as u64) as usize;
        let sign = if hash >> 63 == 0 { 1.0 } else { -1.0 };
        sums[bucket] += sign * weight;
    };
    for word in &words {
        add(&[b"w:", word.as_bytes()], 1.0);
    }
    for pair in words.windows(2) {
        add(&[b"b:", pair[0].as_bytes(), b" ", pair[1].as_bytes()], 0.5);
    }

    let norm = sums.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return fixed_unit_vector(dims);
    }
    sums.iter().map(|x| (x / norm) as f32).collect()
}

/// The vector of a text with no words: every component equal, norm 1.
fn fixed_unit_vector(dims: usize) -> Vec<f32> {
    vec![(1.0 / (dims as f64).sqrt()) as f32; dims]
}

/// 64-bit FNV-1a over the concatenation of `parts`.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET_BASIS;
    for part in parts {
        for &byte in *part {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    // FNV's top bit depends weakly on the last bytes; one round of a 64-bit finaliser (from
    // splitmix64) spreads every input bit into the sign bit and the bucket.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// Cosine similarity of two vectors of the same length (tests and the benchmark).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm_a = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let norm_b = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if norm_a == 0.0 || norm_b == 0.0 {
        return 0.0;
    }
    dot / (norm_a * norm_b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(v: &[f32]) -> f64 {
        v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn is_deterministic_finite_and_normalised() {
        for dims in [1, 2, 3, 256, 1536, 3072] {
            for text in [
                "",
                "   ",
                "!!!",
                "pump",
                "The pump seal leaks oil.",
                "ünïcode wörds 42",
            ] {
                let v = embedding(text, dims);
                assert_eq!(v.len(), dims);
                assert!(v.iter().all(|x| x.is_finite()));
                assert!((norm(&v) - 1.0).abs() < 1e-5, "{text:?} {dims}");
                assert_eq!(v, embedding(text, dims));
            }
        }
        assert!(embedding("anything", 0).is_empty());
    }

    #[test]
    fn empty_texts_share_the_fixed_vector() {
        assert_eq!(embedding("", 64), embedding("?!", 64));
    }

    #[test]
    fn case_and_punctuation_do_not_matter() {
        assert_eq!(
            embedding("Pump seal, leaking!", 512),
            embedding("pump SEAL leaking", 512)
        );
    }

    #[test]
    fn similar_texts_are_closer_than_unrelated_ones() {
        let dims = 1536;
        let a = embedding(
            "the hydraulic pump seal is leaking oil under pressure",
            dims,
        );
        let b = embedding("hydraulic pump seal leaking oil at high pressure", dims);
        let c = embedding("replace the cabin air filter every twelve months", dims);
        assert!(cosine(&a, &b) > 0.5, "{}", cosine(&a, &b));
        assert!(cosine(&a, &b) > cosine(&a, &c) + 0.3);
        assert!(cosine(&b, &c) < 0.3);
    }

    #[test]
    fn vectors_are_pinned() {
        // Stored vectors are compared with recomputed ones: a change to the hash, the features
        // or the weights must be a deliberate one, made here too.
        assert_eq!(fnv1a(&[b"w:", b"pump"]), fnv1a(&[b"w:pump"]));
        let bits: Vec<u32> = embedding("Pump seal leaks", 8)
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(
            bits,
            [0, 3207922931, 1047616495, 0, 0, 0, 1056005103, 3203488751]
        );
    }
}
