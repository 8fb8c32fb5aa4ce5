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

/// Words with the frequencies of real prose, for text whose vocabulary grows as a real
/// corpus's does: the benchmark's chunks. [`chunk_text`]'s templates repeat a few hundred
/// words, which flatters anything that remembers words (the token counter does).
///
/// The most common words are English's; the long tail is built of English parts. Word `r`
/// (from 0) is drawn with probability ∝ 1/(r + 2.7)^1.35 (Zipf–Mandelbrot).
/// Over 10 MB of text that gives about as many distinct pre-tokenizer pieces as 10 MB of real
/// technical documentation (≈ 60,000; measured on the vim manual).
pub struct Vocabulary {
    /// Cumulative probability of the words up to each rank.
    cumulative: Vec<f64>,
}

const COMMON_WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "for",
    "that",
    "it",
    "on",
    "with",
    "as",
    "be",
    "this",
    "by",
    "are",
    "or",
    "at",
    "from",
    "not",
    "if",
    "when",
    "can",
    "which",
    "an",
    "will",
    "all",
    "has",
    "used",
    "may",
    "each",
    "than",
    "then",
    "must",
    "should",
    "before",
    "after",
    "into",
    "only",
    "check",
    "valve",
    "pressure",
    "pump",
    "oil",
    "filter",
    "motor",
    "unit",
    "system",
    "temperature",
    "operator",
    "service",
    "replace",
    "inspect",
    "hours",
    "bolts",
];

/// The long tail: words built like English ones, a prefix, one or more roots and a suffix.
const PREFIXES: &[&str] = &[
    "", "re", "un", "pre", "dis", "over", "inter", "sub", "counter", "de", "non", "multi",
];
const ROOTS: &[&str] = &[
    "port", "form", "act", "struct", "spect", "duct", "press", "tract", "mit", "pos", "vert",
    "flow", "lock", "seal", "gear", "load", "shaft", "cool", "heat", "pipe", "wire", "volt",
    "pump", "drive", "fix", "mount", "guard", "weld", "cast", "bore", "clamp", "feed", "grind",
    "gauge", "hinge", "lift", "mesh", "pitch", "plate", "ring", "rod", "screw", "sleeve", "spring",
    "stroke", "thread", "track", "turn", "vent", "wheel", "cycle", "charge", "sense", "phase",
    "meter", "scope", "tune", "print", "scan", "code", "link", "fuse", "switch", "cell",
];
const SUFFIXES: &[&str] = &[
    "", "s", "ed", "ing", "er", "ion", "able", "ment", "ly", "al", "ive", "ers",
];

impl Vocabulary {
    /// A vocabulary of `size` words.
    pub fn new(size: usize) -> Vocabulary {
        let mut total = 0.0;
        let mut cumulative: Vec<f64> = (0..size.max(1))
            .map(|rank| {
                total += (rank as f64 + 2.7).powf(-1.35);
                total
            })
            .collect();
        for p in &mut cumulative {
            *p /= total;
        }
        Vocabulary { cumulative }
    }

    /// Writes the word of `rank`.
    fn push_word(rank: usize, text: &mut String) {
        if let Some(word) = COMMON_WORDS.get(rank) {
            text.push_str(word);
            return;
        }
        let mut rest = rank - COMMON_WORDS.len();
        let take = |rest: &mut usize, from: &[&'static str]| {
            let part = from[*rest % from.len()];
            *rest /= from.len();
            part
        };
        let prefix = take(&mut rest, PREFIXES);
        let root = take(&mut rest, ROOTS);
        let suffix = take(&mut rest, SUFFIXES);
        text.push_str(prefix);
        text.push_str(root);
        while rest > 0 {
            text.push_str(take(&mut rest, ROOTS));
        }
        text.push_str(suffix);
    }

    fn draw(&self, rng: &mut StdRng) -> usize {
        let p: f64 = rng.random();
        self.cumulative
            .partition_point(|&c| c < p)
            .min(self.cumulative.len() - 1)
    }

    /// About 800 bytes of prose in sentences: words of this vocabulary, with now and then a
    /// component of `family`, a quantity or a part number.
    pub fn chunk(&self, family: &FamilyTemplate, rng: &mut StdRng) -> String {
        let mut text = String::with_capacity(900);
        text.push_str(family.name);
        text.push_str(" service manual.");
        while text.len() < 760 {
            let n_words = rng.random_range(6..20);
            for i in 0..n_words {
                text.push(' ');
                let start = text.len();
                match rng.random_range(0..40) {
                    0 => text
                        .push_str(family.components[rng.random_range(0..family.components.len())]),
                    1 => text.push_str(&format!("{} bar", rng.random_range(1..400))),
                    2 => text.push_str(&format!(
                        "P-{:04}-{}",
                        rng.random_range(0..10_000),
                        char::from(b'A' + rng.random_range(0..26u8))
                    )),
                    _ => Self::push_word(self.draw(rng), &mut text),
                }
                if i == 0 {
                    // The sentence starts with a capital.
                    let first = text[start..].chars().next().map_or(0, char::len_utf8);
                    let upper = text[start..start + first].to_uppercase();
                    text.replace_range(start..start + first, &upper);
                } else if i + 1 < n_words && rng.random_range(0..8) == 0 {
                    text.push(',');
                }
            }
            text.push('.');
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prose_chunks_are_manual_sized_and_their_vocabulary_grows() {
        let vocabulary = Vocabulary::new(1_000_000);
        let mut rng = StdRng::seed_from_u64(1);
        let chunks: Vec<String> = (0..2_000)
            .map(|i| vocabulary.chunk(&FAMILIES[i % FAMILIES.len()], &mut rng))
            .collect();
        let mut words = std::collections::HashSet::new();
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(chunk.starts_with(FAMILIES[i % FAMILIES.len()].name));
            assert!((760..1_000).contains(&chunk.len()), "{} bytes", chunk.len());
            assert!(chunk.ends_with('.'));
            words.extend(chunk.split_whitespace());
        }
        // ~1.6 MB: 27,757 distinct words here; 38,036 in the first 1.6 MB of the vim manual
        // (split at whitespace alike); a few hundred in the templates of `chunk_text`.
        assert!(words.len() > 20_000, "{} distinct words", words.len());
        let mut again = StdRng::seed_from_u64(1);
        assert_eq!(vocabulary.chunk(&FAMILIES[0], &mut again), chunks[0]);
    }
}
