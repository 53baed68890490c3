//! Round trip times between testbed hosts: the `world` profile and a uniform one.
//!
//! The `world` profile puts the origin in the Netherlands and the mirrors, in order, in Germany, Lithuania, the US
//! east coast, the US west coast, Singapore, Brazil, Australia and South Africa ([`WORLD_SITES`]); a ninth mirror
//! and later ones take the sites again from Germany on (mirror `k` sits where mirror `(k - 1) % 8 + 1` does), and
//! two hosts at one site are the model's fixed cost (1.0 ms) apart.
//!
//! The model: light in fibre covers the great-circle distance between two sites at 2/3 of c (about 200 km per ms),
//! real routes are longer than the great circle and every path adds a fixed cost (switching, last mile):
//!
//! ```text
//! rtt(a, b) = fixed + inflation * 2 * great_circle(a, b) / (2/3 c)
//! ```
//!
//! The two parameters are solved from two anchors, the round trips of an earlier field measurement of this
//! project: Netherlands–Germany (Amsterdam–Frankfurt, 364 km) [`NEAR_ANCHOR_RTT_MS`] = 8 ms and the longest pair,
//! US west coast–South Africa (San Jose–Johannesburg, 16,932 km) [`FAR_ANCHOR_RTT_MS`] = 327 ms. That gives
//! `inflation` = 1.92 and `fixed` = 1.0 ms. Path inflation of this size over the fibre great-circle time is what
//! measurement studies of the Internet report (Singla et al., "The Internet at the Speed of Light", HotNets 2014:
//! ping round trips about three times the speed-of-light time, i.e. about twice the time in fibre). The model
//! overstates some well-cabled routes (NL–US-East comes out at 120 ms, public measurements show about 80 ms) and
//! is close on others; what matters here is the spread, 8 to 327 ms, with the origin close to two mirrors and far
//! from the rest. BENCHMARKS.md (WAN) prints the whole matrix.

use std::fmt;

/// A place a host sits: a name and the coordinates of a city with large data centres there.
#[derive(Clone, Copy, Debug)]
pub struct Site {
    pub name: &'static str,
    /// Degrees north.
    pub lat: f64,
    /// Degrees east.
    pub lon: f64,
}

/// The origin's site, then the mirrors' in order (mirror 1 is Germany).
pub const WORLD_SITES: [Site; 9] = [
    Site { name: "NL", lat: 52.37, lon: 4.90 },         // Amsterdam
    Site { name: "DE", lat: 50.11, lon: 8.68 },         // Frankfurt
    Site { name: "LT", lat: 54.69, lon: 25.28 },        // Vilnius
    Site { name: "US-East", lat: 39.04, lon: -77.49 },  // Ashburn
    Site { name: "US-West", lat: 37.34, lon: -121.89 }, // San Jose
    Site { name: "SG", lat: 1.35, lon: 103.82 },        // Singapore
    Site { name: "BR", lat: -23.55, lon: -46.63 },      // São Paulo
    Site { name: "AU", lat: -33.87, lon: 151.21 },      // Sydney
    Site { name: "ZA", lat: -26.20, lon: 28.05 },       // Johannesburg
];

/// Mean Earth radius, km.
const EARTH_RADIUS_KM: f64 = 6371.0;
/// Light in fibre (refractive index about 1.5): 2/3 of c, in km per ms.
const FIBRE_KM_PER_MS: f64 = 299_792.458 * 2.0 / 3.0 / 1000.0;
/// Anchor: the round trip Netherlands–Germany (sites 0 and 1).
pub const NEAR_ANCHOR_RTT_MS: f64 = 8.0;
/// Anchor: the round trip of the longest pair, US-West–South Africa (sites 4 and 8).
pub const FAR_ANCHOR_RTT_MS: f64 = 327.0;
/// Largest round trip a profile may give a pair (a uniform `--rtt-ms` included): more than any path on Earth, and
/// it bounds what the emulator holds (a host's download rate times the longest one-way delay).
pub const RTT_MS_MAX: f64 = 2000.0;

/// Great-circle distance between two sites (haversine), km.
pub fn great_circle_km(a: &Site, b: &Site) -> f64 {
    let (la1, la2) = (a.lat.to_radians(), b.lat.to_radians());
    let dlat = la2 - la1;
    let dlon = (b.lon - a.lon).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// The round trip in fibre along the great circle, ms.
fn fibre_rtt_ms(a: &Site, b: &Site) -> f64 {
    2.0 * great_circle_km(a, b) / FIBRE_KM_PER_MS
}

/// `(fixed ms, inflation)` solved from the two anchors.
pub fn model_parameters() -> (f64, f64) {
    let near = fibre_rtt_ms(&WORLD_SITES[0], &WORLD_SITES[1]);
    let far = fibre_rtt_ms(&WORLD_SITES[4], &WORLD_SITES[8]);
    let inflation = (FAR_ANCHOR_RTT_MS - NEAR_ANCHOR_RTT_MS) / (far - near);
    (NEAR_ANCHOR_RTT_MS - inflation * near, inflation)
}

/// The site of host `i` (0 is the origin) in the world profile.
pub fn world_site(i: usize) -> &'static Site {
    if i == 0 { &WORLD_SITES[0] } else { &WORLD_SITES[(i - 1) % (WORLD_SITES.len() - 1) + 1] }
}

/// Which round trips a testbed's pairs get.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RttProfile {
    /// Every pair the same round trip, ms (0: the emulator runs and delays nothing).
    Uniform(f64),
    /// The world map above.
    World,
}

impl RttProfile {
    /// The round trip between hosts `a` and `b` (0 is the origin), ms.
    pub fn rtt_ms(&self, a: usize, b: usize) -> f64 {
        match *self {
            RttProfile::Uniform(ms) => ms,
            RttProfile::World => {
                let (fixed, inflation) = model_parameters();
                fixed + inflation * fibre_rtt_ms(world_site(a), world_site(b))
            }
        }
    }

    /// The name of host `i` in this profile's tables (`origin` or `mirrorK`, with its site in the world profile).
    pub fn host_name(&self, i: usize) -> String {
        let base = if i == 0 { "origin".to_owned() } else { format!("mirror{i}") };
        match self {
            RttProfile::Uniform(_) => base,
            RttProfile::World => format!("{base} ({})", world_site(i).name),
        }
    }
}

impl fmt::Display for RttProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RttProfile::Uniform(ms) => write!(f, "every round trip {ms} ms"),
            RttProfile::World => write!(
                f,
                "world profile (origin NL; mirrors DE, LT, US-East, US-West, SG, BR, AU, ZA; round trips \
                 {NEAR_ANCHOR_RTT_MS}-{FAR_ANCHOR_RTT_MS} ms)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_world_profile_meets_its_anchors_and_stays_between_them() {
        let world = RttProfile::World;
        assert!((world.rtt_ms(0, 1) - 8.0).abs() < 1e-9, "NL-DE {}", world.rtt_ms(0, 1));
        let mut longest = (0.0, 0, 0);
        for a in 0..9 {
            for b in 0..9 {
                let rtt = world.rtt_ms(a, b);
                assert!((rtt - world.rtt_ms(b, a)).abs() < 1e-9, "symmetric");
                if a != b {
                    assert!((8.0 - 1e-9..=327.0 + 1e-9).contains(&rtt), "{a}-{b}: {rtt}");
                }
                if rtt > longest.0 {
                    longest = (rtt, a.min(b), a.max(b));
                }
            }
        }
        assert_eq!((longest.1, longest.2), (4, 8), "US-West-ZA is the longest pair");
        assert!((longest.0 - 327.0).abs() < 1e-9);
        let (fixed, inflation) = model_parameters();
        assert!((0.5..1.5).contains(&fixed) && (1.8..2.0).contains(&inflation), "{fixed} {inflation}");
    }

    #[test]
    fn more_mirrors_than_sites_take_the_sites_again() {
        let world = RttProfile::World;
        assert_eq!(world_site(9).name, "DE");
        assert_eq!(world_site(16).name, "ZA");
        assert!((world.rtt_ms(1, 9) - model_parameters().0).abs() < 1e-9, "same site: the fixed cost");
        assert_eq!(world.rtt_ms(0, 9), world.rtt_ms(0, 1));
    }

    #[test]
    fn great_circle_distances_match_known_ones() {
        // Amsterdam-Frankfurt about 364 km, San Jose-Johannesburg about 16,930 km.
        let d = great_circle_km(&WORLD_SITES[0], &WORLD_SITES[1]);
        assert!((355.0..375.0).contains(&d), "{d}");
        let d = great_circle_km(&WORLD_SITES[4], &WORLD_SITES[8]);
        assert!((16_800.0..17_100.0).contains(&d), "{d}");
    }
}
