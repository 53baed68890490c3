//! The built-in package-size profile: what a real Alpine repository's `.apk` sizes look like, so that
//! `gen-tree` without `--apkindex` produces a realistic tree without any external file.
//!
//! # How the table was derived
//!
//! Source: `../shared/data/alpine-v3.17-main-aarch64.APKINDEX.tar.gz` (DESCRIPTION `v3.17.3-216-g54a39ace82a`),
//! 5004 packages whose `S:` fields sum to 3,872,279,122 bytes (3.61 GiB).
//!
//! 1. Take the `S:` value of every stanza and sort ascending: `s[0] <= ... <= s[n-1]`, `n = 5004`.
//! 2. For `k = 0..=1000` ([`QUANTILE_STEPS`]), entry `k` is the size at fractional rank `r = k * (n - 1) / 1000`:
//!    with `i = floor(r)` and `f = r - i`, the value `s[i] + (s[i+1] - s[i]) * f`, rounded half up. The arithmetic
//!    is done in integers exactly as in [`quantiles_from_sizes`]; entry 0 is the minimum, entry 1000 the maximum.
//!
//! `tests/gen_tree.rs` recomputes the table from the real index with [`quantiles_from_sizes`] and fails if the
//! embedded [`SIZE_QUANTILES`] differs, so the table cannot silently drift from its source.
//!
//! # What it reproduces
//!
//! [`profile_sizes`]`(5004)` (the sizes the generator uses) reproduces the source within a fraction of a percent:
//! total 3.61 GiB, median 24.4 KiB, 42.1% of files under 16 KiB, p90 659 KiB, p99 16.8 MiB, max 124.4 MiB; the
//! largest 1% of files hold 51.3% of the bytes and the largest 10% hold 91.7% (source: 51.4% and 91.7%).
//! Linear interpolation between 1001 points is what makes the byte share of the heavy tail come out right:
//! coarser tables (200 or 500 points) overstate it by 1-6 percentage points.

/// Number of packages in the source index (v3.17 main aarch64); the built-in profile generates this many.
pub const PROFILE_PACKAGE_COUNT: usize = 5004;

/// Number of intervals in [`SIZE_QUANTILES`]; the table has `QUANTILE_STEPS + 1` entries.
pub const QUANTILE_STEPS: usize = 1000;

/// Package sizes in bytes at quantiles `k / QUANTILE_STEPS`, `k = 0..=QUANTILE_STEPS`, of the v3.17 main aarch64
/// index. See the module documentation for the exact derivation.
#[rustfmt::skip]
pub const SIZE_QUANTILES: [u64; QUANTILE_STEPS + 1] = [
    1413, 1438, 1450, 1458, 1464, 1469, 1472, 1474, 1476, 1477,
    1481, 1484, 1488, 1491, 1496, 1504, 1506, 1526, 1530, 1545,
    1562, 1599, 1637, 1648, 1692, 1720, 1754, 1775, 1791, 1801,
    1837, 1855, 1878, 1907, 1939, 1965, 1982, 1995, 2016, 2027,
    2042, 2066, 2079, 2092, 2113, 2120, 2135, 2166, 2205, 2211,
    2236, 2256, 2265, 2292, 2322, 2347, 2371, 2381, 2389, 2422,
    2471, 2500, 2535, 2575, 2596, 2626, 2673, 2729, 2773, 2802,
    2848, 2883, 2906, 2922, 2950, 2956, 2969, 3009, 3032, 3069,
    3074, 3081, 3107, 3122, 3164, 3184, 3214, 3231, 3269, 3296,
    3321, 3344, 3378, 3396, 3412, 3423, 3438, 3514, 3534, 3565,
    3590, 3639, 3665, 3686, 3705, 3733, 3769, 3787, 3807, 3819,
    3840, 3862, 3886, 3917, 3930, 3967, 3973, 3985, 4017, 4042,
    4076, 4099, 4116, 4137, 4155, 4190, 4221, 4235, 4264, 4288,
    4299, 4316, 4339, 4348, 4377, 4397, 4419, 4451, 4468, 4489,
    4508, 4517, 4526, 4541, 4550, 4576, 4604, 4621, 4645, 4676,
    4697, 4711, 4743, 4782, 4804, 4818, 4840, 4856, 4867, 4876,
    4911, 4916, 4938, 4966, 4985, 4990, 5026, 5048, 5060, 5072,
    5100, 5138, 5159, 5170, 5193, 5212, 5238, 5257, 5293, 5339,
    5375, 5395, 5412, 5458, 5494, 5534, 5551, 5585, 5612, 5621,
    5636, 5656, 5681, 5701, 5729, 5751, 5785, 5808, 5832, 5869,
    5887, 5898, 5944, 5971, 5998, 6031, 6047, 6068, 6084, 6114,
    6142, 6160, 6185, 6199, 6234, 6250, 6276, 6301, 6310, 6314,
    6361, 6405, 6450, 6502, 6553, 6578, 6605, 6621, 6630, 6651,
    6677, 6699, 6704, 6736, 6755, 6796, 6830, 6857, 6912, 6933,
    6949, 6964, 7026, 7053, 7080, 7103, 7124, 7131, 7155, 7195,
    7232, 7267, 7277, 7301, 7334, 7367, 7411, 7426, 7463, 7503,
    7550, 7602, 7628, 7670, 7715, 7743, 7776, 7797, 7849, 7885,
    7925, 7983, 8020, 8051, 8087, 8120, 8159, 8190, 8251, 8281,
    8318, 8340, 8361, 8387, 8470, 8523, 8572, 8598, 8637, 8669,
    8722, 8778, 8790, 8824, 8866, 8901, 8948, 9007, 9043, 9137,
    9197, 9226, 9251, 9281, 9318, 9353, 9388, 9441, 9484, 9543,
    9573, 9610, 9704, 9734, 9777, 9805, 9854, 9935, 9958, 9991,
    10026, 10091, 10146, 10166, 10193, 10245, 10262, 10333, 10371, 10431,
    10461, 10527, 10612, 10677, 10767, 10811, 10855, 10910, 10949, 10977,
    11020, 11077, 11094, 11105, 11173, 11209, 11287, 11358, 11446, 11508,
    11563, 11658, 11664, 11726, 11762, 11801, 11860, 11903, 11949, 12026,
    12065, 12092, 12207, 12216, 12246, 12317, 12406, 12461, 12517, 12565,
    12621, 12691, 12771, 12854, 12908, 12948, 13020, 13077, 13135, 13250,
    13327, 13367, 13443, 13466, 13502, 13587, 13603, 13635, 13677, 13727,
    13756, 13779, 13808, 13828, 13861, 13955, 14013, 14080, 14168, 14295,
    14326, 14392, 14520, 14567, 14646, 14705, 14752, 14872, 14905, 15029,
    15083, 15154, 15262, 15365, 15435, 15572, 15642, 15752, 15845, 16097,
    16236, 16355, 16537, 16656, 16682, 16847, 16916, 17071, 17112, 17184,
    17324, 17456, 17508, 17553, 17662, 17771, 17896, 17942, 18020, 18248,
    18299, 18392, 18472, 18582, 18654, 18745, 18816, 18920, 19024, 19132,
    19269, 19353, 19405, 19464, 19542, 19638, 19736, 19801, 19880, 19987,
    20142, 20237, 20356, 20404, 20525, 20609, 20640, 20760, 20839, 20957,
    21072, 21150, 21264, 21421, 21497, 21617, 21707, 21875, 21992, 22121,
    22171, 22280, 22442, 22651, 22733, 22842, 23026, 23115, 23260, 23397,
    23538, 23773, 24010, 24233, 24372, 24483, 24580, 24701, 24816, 24858,
    24926, 25040, 25152, 25282, 25422, 25489, 25553, 25810, 25904, 26005,
    26124, 26217, 26276, 26424, 26603, 26733, 27022, 27148, 27300, 27454,
    27551, 27674, 27879, 28236, 28369, 28506, 28616, 28909, 29119, 29318,
    29515, 29726, 29963, 30056, 30177, 30253, 30558, 30686, 30841, 31010,
    31264, 31640, 31808, 31994, 32103, 32211, 32479, 32685, 32743, 33050,
    33218, 33495, 33560, 33915, 34164, 34251, 34346, 34523, 34665, 34916,
    35070, 35153, 35389, 35646, 35701, 35881, 36453, 36932, 37147, 37359,
    37510, 37724, 37840, 38204, 38349, 38563, 38753, 38895, 39082, 39377,
    39544, 40028, 40215, 40339, 40586, 40843, 41036, 41174, 41421, 41825,
    42077, 42352, 42575, 42972, 43152, 43304, 43719, 43970, 44149, 44316,
    44469, 44615, 45090, 45403, 45534, 45712, 45954, 46478, 46712, 46823,
    47108, 47319, 47445, 47768, 48212, 48451, 48985, 49166, 49416, 49939,
    50200, 50346, 50684, 50931, 51207, 51571, 51937, 52268, 52563, 53207,
    53532, 53770, 53995, 54309, 54524, 54937, 55265, 55594, 55798, 56151,
    56440, 56808, 57122, 57377, 57897, 57968, 58571, 58986, 59360, 59597,
    60356, 60554, 60891, 61522, 62160, 62602, 63275, 63556, 64037, 64662,
    65161, 65756, 66191, 66487, 67455, 68009, 68406, 68773, 69201, 69478,
    69810, 70285, 70709, 71008, 71492, 72141, 72529, 73381, 73903, 74511,
    75252, 75805, 76061, 76404, 77280, 78243, 78480, 79005, 79771, 80755,
    81213, 81410, 81805, 82483, 83152, 83538, 84155, 84416, 85149, 85641,
    86121, 86562, 87270, 87945, 88439, 88816, 89865, 90155, 90486, 91566,
    92043, 92693, 93449, 94403, 94786, 95515, 96024, 96637, 98139, 98658,
    99979, 100296, 101245, 102420, 102738, 103177, 104107, 104942, 105905, 106864,
    107414, 108177, 109197, 109729, 110147, 111067, 111817, 112169, 113022, 114145,
    115267, 116077, 117122, 120049, 121013, 122140, 122990, 124522, 125347, 126411,
    126834, 128819, 129425, 130066, 131914, 132601, 134022, 135564, 136203, 137301,
    138158, 139191, 140352, 141349, 142049, 142869, 144465, 146140, 148947, 149909,
    151081, 152238, 153746, 154203, 155920, 156877, 157500, 159368, 161582, 163319,
    165205, 166061, 166921, 168552, 171216, 172616, 173958, 174968, 177463, 180329,
    181859, 184389, 185530, 187158, 190085, 191756, 194785, 195654, 196523, 197836,
    199171, 200075, 201377, 204246, 206055, 208673, 210010, 211702, 213391, 214897,
    218267, 221573, 225127, 226524, 228906, 232711, 234424, 235036, 236962, 238587,
    242733, 245593, 249273, 251443, 256743, 259653, 264933, 269763, 270420, 272807,
    276804, 280381, 282320, 285485, 290403, 293065, 301074, 302396, 308735, 310244,
    312936, 314781, 316823, 318921, 320736, 322867, 325749, 328663, 332477, 336585,
    345128, 347902, 349953, 352636, 355405, 361119, 363213, 366167, 370099, 378232,
    382674, 385692, 394362, 401645, 406754, 413139, 416049, 419882, 426120, 432432,
    442192, 446703, 454064, 459871, 467832, 472991, 478015, 480216, 486720, 490895,
    493724, 497160, 501686, 505373, 514612, 522136, 525930, 539425, 552780, 562536,
    575751, 581387, 588864, 598009, 606193, 611266, 621604, 636435, 648093, 657099,
    674467, 686248, 696748, 710314, 723582, 730655, 741387, 748160, 762184, 769704,
    783383, 800601, 821463, 828628, 840710, 846888, 867860, 872651, 884053, 897271,
    912750, 927452, 954375, 989706, 1014694, 1024607, 1040292, 1101137, 1118530, 1156108,
    1178759, 1201430, 1221893, 1248597, 1282060, 1326322, 1342941, 1400148, 1416136, 1455538,
    1501595, 1563349, 1586006, 1620430, 1651772, 1720372, 1763547, 1808385, 1888888, 1998706,
    2092291, 2153127, 2264269, 2347358, 2421341, 2503935, 2560284, 2665828, 2784926, 2850315,
    2970407, 3022409, 3231689, 3350047, 3585385, 3743232, 3887396, 4014042, 4304037, 4554435,
    4746557, 4881308, 5452531, 5693479, 6034704, 6409319, 7336228, 7668906, 8147310, 8758541,
    9169477, 9690308, 10117821, 10919064, 11350542, 11959200, 12904328, 13414720, 14486300, 15831171,
    17564485, 18795516, 19868116, 22315092, 25105107, 27477901, 35348861, 41448101, 52213107, 69972089,
    130455998,
];

/// Computes the quantile table of `sorted_sizes` (ascending) with `steps` intervals, exactly as [`SIZE_QUANTILES`]
/// was derived: entry `k` is the value at fractional rank `k * (n - 1) / steps`, linearly interpolated between the
/// two neighbouring ranks and rounded half up. Returns an empty vector for empty input or `steps == 0`.
pub fn quantiles_from_sizes(sorted_sizes: &[u64], steps: usize) -> Vec<u64> {
    let n = sorted_sizes.len();
    if n == 0 || steps == 0 {
        return Vec::new();
    }
    let steps_wide = steps as u128;
    (0..=steps)
        .map(|k| {
            let numerator = k as u128 * (n as u128 - 1);
            let rank = (numerator / steps_wide) as usize;
            let remainder = numerator % steps_wide;
            interpolate(sorted_sizes, rank, remainder, steps_wide)
        })
        .collect()
}

/// The sizes of `count` packages following the built-in profile, ascending: package `i` gets the profile's value
/// at quantile `i / (count - 1)`, so the smallest gets the minimum and the largest the maximum, and for
/// `count == PROFILE_PACKAGE_COUNT` the set reproduces the source index's distribution (see the module docs).
pub fn profile_sizes(count: usize) -> Vec<u64> {
    match count {
        0 => Vec::new(),
        1 => vec![SIZE_QUANTILES[QUANTILE_STEPS / 2]],
        _ => {
            let denominator = count as u128 - 1;
            (0..count)
                .map(|i| {
                    let numerator = i as u128 * QUANTILE_STEPS as u128;
                    let point = (numerator / denominator) as usize;
                    let remainder = numerator % denominator;
                    interpolate(&SIZE_QUANTILES, point, remainder, denominator)
                })
                .collect()
        }
    }
}

/// `values[index] + (values[index + 1] - values[index]) * remainder / denominator`, rounded half up; `values` is
/// non-decreasing and `remainder < denominator`. At the last index (where `remainder` is 0) returns the last value.
fn interpolate(values: &[u64], index: usize, remainder: u128, denominator: u128) -> u64 {
    let low = values[index];
    if remainder == 0 || index + 1 >= values.len() {
        return low;
    }
    let high = values[index + 1];
    let step = u128::from(high.saturating_sub(low));
    low + ((step * remainder + denominator / 2) / denominator) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_positive() {
        assert!(SIZE_QUANTILES.windows(2).all(|w| w[0] <= w[1]));
        assert!(SIZE_QUANTILES[0] > 0);
    }

    #[test]
    fn profile_sizes_hit_the_table_ends() {
        let sizes = profile_sizes(PROFILE_PACKAGE_COUNT);
        assert_eq!(sizes.len(), PROFILE_PACKAGE_COUNT);
        assert_eq!(sizes[0], SIZE_QUANTILES[0]);
        assert_eq!(sizes[PROFILE_PACKAGE_COUNT - 1], SIZE_QUANTILES[QUANTILE_STEPS]);
        assert!(sizes.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(profile_sizes(0), Vec::<u64>::new());
        assert_eq!(profile_sizes(1).len(), 1);
        assert_eq!(profile_sizes(2), vec![SIZE_QUANTILES[0], SIZE_QUANTILES[QUANTILE_STEPS]]);
    }

    #[test]
    fn quantiles_of_a_table_reproduce_it() {
        // A table of QUANTILE_STEPS + 1 sorted values is its own quantile table.
        assert_eq!(quantiles_from_sizes(&SIZE_QUANTILES, QUANTILE_STEPS), SIZE_QUANTILES.to_vec());
        assert_eq!(quantiles_from_sizes(&[5, 7], 2), vec![5, 6, 7]);
        assert!(quantiles_from_sizes(&[], 10).is_empty());
    }
}
