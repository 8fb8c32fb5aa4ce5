//! A sample corpus of equipment-manual-like chunks, for the demo, the benchmark and tests.
//!
//! Deterministic (a seeded generator), so a demo run shows the same figures every time. It
//! writes nothing itself: callers insert the rows.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One equipment family and the vocabulary its manuals use.
pub struct FamilyTemplate {
    pub name: &'static str,
    pub components: &'static [&'static str],
    pub faults: &'static [&'static str],
}

pub const FAMILIES: &[FamilyTemplate] = &[
    FamilyTemplate {
        name: "Hydraulic excavators",
        components: &[
            "hydraulic pump",
            "boom cylinder",
            "swing motor",
            "track tensioner",
            "bucket teeth",
            "pilot valve",
            "return filter",
            "hydraulic oil cooler",
        ],
        faults: &[
            "slow boom movement",
            "oil leak at the cylinder seal",
            "overheating hydraulic oil",
            "track slipping",
        ],
    },
    FamilyTemplate {
        name: "Refrigeration units",
        components: &[
            "compressor",
            "condenser coil",
            "evaporator fan",
            "expansion valve",
            "defrost heater",
            "refrigerant charge",
            "door gasket",
            "thermostat",
        ],
        faults: &[
            "ice build-up on the evaporator",
            "compressor short cycling",
            "warm cabinet temperature",
            "frost on the door gasket",
        ],
    },
    FamilyTemplate {
        name: "Wind turbines",
        components: &[
            "pitch bearing",
            "yaw drive",
            "gearbox",
            "main shaft",
            "generator brushes",
            "blade leading edge",
            "anemometer",
            "converter cabinet",
        ],
        faults: &[
            "gearbox vibration",
            "pitch motor fault",
            "yaw misalignment",
            "converter overtemperature",
        ],
    },
];

const ACTIONS: &[&str] = &[
    "Inspect the {c} for wear and cracks every 250 operating hours.",
    "Before servicing the {c}, lock out the machine and release stored pressure.",
    "Clean the {c} with a lint-free cloth; never use compressed air above 2 bar.",
    "Replace the {c} if the measured clearance exceeds the limit in table 4.",
    "Torque the {c} mounting bolts to 85 N·m in a cross pattern.",
    "Record the {c} readings in the maintenance log after each shift.",
];

const TROUBLESHOOTING: &[&str] = &[
    "Symptom: {f}. Likely cause: a worn {c}. Check it first, then the wiring harness.",
    "If you notice {f}, stop operation and check the {c} before restarting.",
    "{f} is often caused by a clogged {c}; clean it and run a test cycle.",
];

/// A generated chunk: its family index in [`FAMILIES`] and its text.
pub struct SampleChunk {
    pub family: usize,
    pub content: String,
}

/// `n` chunks spread over the families, with a few empty and a few over-long ones (so that
/// the plan's report of skipped chunks has something to show) when `with_oddities`.
pub fn generate(n: usize, seed: u64, with_oddities: bool) -> Vec<SampleChunk> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let family = i % FAMILIES.len();
            let content = if with_oddities && i % 997 == 13 {
                String::new()
            } else if with_oddities && i % 1499 == 7 {
                // Far over the 8191-token limit: a pasted parts catalogue.
                (0..9000).map(|k| format!("P{k:05} ")).collect()
            } else {
                chunk_text(&FAMILIES[family], &mut rng)
            };
            SampleChunk { family, content }
        })
        .collect()
}

/// About 800 bytes of manual-like text for one family.
pub fn chunk_text(family: &FamilyTemplate, rng: &mut StdRng) -> String {
    let mut text = String::with_capacity(900);
    text.push_str(family.name);
    text.push_str(" service manual. ");
    while text.len() < 760 {
        let component = family.components[rng.random_range(0..family.components.len())];
        let sentence = if rng.random_bool(0.3) {
            let fault = family.faults[rng.random_range(0..family.faults.len())];
            TROUBLESHOOTING[rng.random_range(0..TROUBLESHOOTING.len())]
                .replace("{f}", fault)
                .replace("{c}", component)
        } else {
            ACTIONS[rng.random_range(0..ACTIONS.len())].replace("{c}", component)
        };
        text.push_str(&sentence);
        text.push(' ');
    }
    text
}
