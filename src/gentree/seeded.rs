//! Deterministic, seed-dependent choices (which packages to select or update, size jitter, build times): each is a
//! keyed blake3 hash of the seed, a purpose string and the identifying parts, so choices made for different
//! purposes or items are independent and never depend on iteration order.

/// blake3 key-derivation context for seeded choices.
const CHOICE_CONTEXT: &str = "mirrormesh gen-tree 2025 seeded choice v1";

/// A pseudo-random 64-bit value determined by `seed`, `purpose` and `parts`.
pub fn seeded_u64(seed: u64, purpose: &str, parts: &[&str]) -> u64 {
    let mut hasher = blake3::Hasher::new_derive_key(CHOICE_CONTEXT);
    hasher.update(&seed.to_le_bytes());
    for part in std::iter::once(&purpose).chain(parts) {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(word)
}

/// A pseudo-random value in `[0, 1)` determined by `seed`, `purpose` and `parts`.
pub fn seeded_unit(seed: u64, purpose: &str, parts: &[&str]) -> f64 {
    // The top 53 bits fill an f64 mantissa exactly.
    (seeded_u64(seed, purpose, parts) >> 11) as f64 / (1u64 << 53) as f64
}

/// Number of items a fraction of `total` selects: `round(fraction * total)`, at least 1 (when `total > 0`) and at
/// most `total`. `fraction` is expected in `(0, 1]`.
pub fn fraction_count(total: usize, fraction: f64) -> usize {
    if total == 0 {
        return 0;
    }
    ((fraction * total as f64).round() as usize).clamp(1, total)
}

/// The indices of the `count` items with the smallest seeded rank, in ascending index order. `ids` gives each item's
/// identifying parts; items are ranked by `seeded_u64(seed, purpose, id)`, so for one seed a smaller selection is
/// always a subset of a larger one.
pub fn select_ranked(ids: &[Vec<&str>], count: usize, seed: u64, purpose: &str) -> Vec<usize> {
    let mut ranked: Vec<(u64, usize)> =
        ids.iter().enumerate().map(|(i, id)| (seeded_u64(seed, purpose, id), i)).collect();
    ranked.sort_unstable();
    let mut chosen: Vec<usize> = ranked.into_iter().take(count).map(|(_, i)| i).collect();
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_deterministic_and_independent() {
        assert_eq!(seeded_u64(1, "a", &["x"]), seeded_u64(1, "a", &["x"]));
        assert_ne!(seeded_u64(1, "a", &["x"]), seeded_u64(2, "a", &["x"]));
        assert_ne!(seeded_u64(1, "a", &["x"]), seeded_u64(1, "b", &["x"]));
        assert_ne!(seeded_u64(1, "a", &["xy"]), seeded_u64(1, "ax", &["y"]));
        let u = seeded_unit(7, "u", &[]);
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn fraction_counts_are_clamped() {
        assert_eq!(fraction_count(5004, 1.0), 5004);
        assert_eq!(fraction_count(5004, 0.01), 50);
        assert_eq!(fraction_count(5004, 1e-9), 1);
        assert_eq!(fraction_count(0, 0.5), 0);
    }

    #[test]
    fn smaller_selections_are_subsets() {
        let names: Vec<String> = (0..100).map(|i| format!("p{i}")).collect();
        let ids: Vec<Vec<&str>> = names.iter().map(|n| vec![n.as_str()]).collect();
        let small = select_ranked(&ids, 10, 3, "select");
        let large = select_ranked(&ids, 30, 3, "select");
        assert_eq!(small.len(), 10);
        assert!(small.iter().all(|i| large.contains(i)));
        assert!(small.windows(2).all(|w| w[0] < w[1]));
        assert_ne!(small, select_ranked(&ids, 10, 4, "select"));
    }
}
