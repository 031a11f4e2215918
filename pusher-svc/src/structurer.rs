//! The built-in deterministic structurer ([`Builtin`]): no network, same input, same output.
//!
//! - **title**: the first sentence of the transcript with leading fillers ("so", "um", "okay")
//!   removed, cut to 8 words, first letter upper-cased; "Untitled conversation" if none.
//! - **overview**: up to 3 sentences with the highest average frequency of their content
//!   words (stop words ignored), in transcript order: an extractive summary.
//! - **action_items**: every sentence holding a commitment ("I will", "I'll", "we need to",
//!   "remember to", "let's", "don't forget to", "we should", "I have to", "I need to"),
//!   deduplicated case-insensitively, at most 10, in order.
//! - **category**: the category whose keywords occur most often (work, finance, health,
//!   travel, education, family, shopping), ties broken in that order; "other" if none occur.
//! - **discard**: fewer than 3 words that are not fillers in the whole transcript ("uh",
//!   "hmm, okay", "yeah yeah"): noise, not a conversation.

use crate::processor::{ProcessError, Structure, Structurer};
use shared::proto::pusher::v1::{ProcessConversation, Segment, Structured};
use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;
use std::time::Duration;

const TITLE_WORDS: usize = 8;
const OVERVIEW_SENTENCES: usize = 3;
const MAX_ACTION_ITEMS: usize = 10;

const FILLERS: &[&str] = &[
    "hmm", "mm", "ah", "oh", "huh", "mhm", "so", "um", "uh", "okay", "ok", "well", "like", "yeah",
    "hey", "hi", "and",
];

const COMMITMENTS: &[&str] = &[
    "i will ",
    "i'll ",
    "we will ",
    "we'll ",
    "we need to ",
    "i need to ",
    "i have to ",
    "we have to ",
    "remember to ",
    "let's ",
    "let us ",
    "don't forget to ",
    "we should ",
];

const CATEGORIES: &[(&str, &[&str])] = &[
    (
        "work",
        &[
            "meeting", "project", "deadline", "client", "release", "deploy", "team", "manager",
            "sprint", "roadmap", "office", "report",
        ],
    ),
    (
        "finance",
        &[
            "budget", "invoice", "payment", "money", "bank", "tax", "salary", "price", "cost",
            "expenses",
        ],
    ),
    (
        "health",
        &[
            "doctor",
            "appointment",
            "medicine",
            "exercise",
            "sleep",
            "hospital",
            "workout",
            "diet",
            "health",
        ],
    ),
    (
        "travel",
        &[
            "flight", "hotel", "trip", "airport", "train", "vacation", "passport", "booking",
        ],
    ),
    (
        "education",
        &[
            "class",
            "exam",
            "homework",
            "lecture",
            "course",
            "study",
            "school",
            "university",
            "teacher",
        ],
    ),
    (
        "family",
        &[
            "mom", "dad", "kids", "family", "birthday", "dinner", "wedding", "brother", "sister",
        ],
    ),
    (
        "shopping",
        &["buy", "groceries", "store", "order", "shopping", "milk"],
    ),
];

const STOP_WORDS: &[&str] = &[
    "a", "an", "the", "and", "or", "but", "if", "then", "so", "to", "of", "in", "on", "at", "for",
    "with", "is", "are", "was", "were", "be", "been", "it", "its", "this", "that", "i", "you",
    "we", "they", "he", "she", "me", "my", "our", "your", "do", "did", "does", "not", "no", "yes",
    "um", "uh", "okay", "ok", "just", "like", "have", "has", "had", "will", "would", "can",
    "could", "should", "about", "what", "there", "here", "from", "by", "as", "up", "out", "all",
];

/// Fewer non-filler words than this in the whole transcript, and it is discarded as noise.
const MIN_WORDS: usize = 3;

static FILLER_SET: LazyLock<HashSet<&str>> = LazyLock::new(|| FILLERS.iter().copied().collect());
static STOP_SET: LazyLock<HashSet<&str>> = LazyLock::new(|| STOP_WORDS.iter().copied().collect());
/// Keyword -> the categories (indexes into CATEGORIES) it counts for.
static KEYWORDS: LazyLock<HashMap<&str, Vec<usize>>> = LazyLock::new(|| {
    let mut map: HashMap<&str, Vec<usize>> = HashMap::new();
    for (index, (_, keywords)) in CATEGORIES.iter().enumerate() {
        for keyword in *keywords {
            map.entry(keyword).or_default().push(index);
        }
    }
    map
});

/// The built-in deterministic structurer, optionally preceded by a simulated latency (to
/// stand in for an LLM call in demos and load tests).
pub(crate) struct Builtin {
    pub simulated_latency: Duration,
}

#[async_trait::async_trait]
impl Structurer for Builtin {
    async fn structure(&self, request: &ProcessConversation) -> Result<Structure, ProcessError> {
        if !self.simulated_latency.is_zero() {
            tokio::time::sleep(self.simulated_latency).await;
        }
        Ok(structure(&request.segments))
    }
}

/// Structures a transcript and judges whether it is worth keeping. Never fails.
///
/// The text is split into sentences and lower-cased words once; every part below reads
/// those (words never span sentences: the sentence marks also end words).
pub(crate) fn structure(segments: &[Segment]) -> Structure {
    let sentences = sentences(segments);
    let words: Vec<Vec<String>> = sentences.iter().map(|s| words(s).collect()).collect();
    let spoken = words
        .iter()
        .flatten()
        .filter(|w| !FILLER_SET.contains(w.as_str()))
        .count();
    Structure {
        structured: Structured {
            title: title(&sentences),
            overview: overview(&sentences, &words),
            action_items: action_items(&sentences),
            category: category(&words).to_string(),
        },
        discard: spoken < MIN_WORDS,
    }
}

/// Splits the transcript into trimmed sentences on `.`, `!`, `?` and segment boundaries.
fn sentences(segments: &[Segment]) -> Vec<String> {
    let mut out = Vec::new();
    for segment in segments {
        let mut current = String::new();
        for ch in segment.text.chars() {
            current.push(ch);
            if matches!(ch, '.' | '!' | '?') {
                push_sentence(&mut out, &current);
                current.clear();
            }
        }
        push_sentence(&mut out, &current);
    }
    out
}

fn push_sentence(out: &mut Vec<String>, raw: &str) {
    let trimmed = raw.trim();
    if trimmed.chars().any(char::is_alphanumeric) {
        out.push(trimmed.to_string());
    }
}

fn words(sentence: &str) -> impl Iterator<Item = String> + '_ {
    sentence
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

fn title(sentences: &[String]) -> String {
    let Some(first) = sentences.first() else {
        return "Untitled conversation".to_string();
    };
    let raw: Vec<&str> = first.split_whitespace().collect();
    let start = raw
        .iter()
        .position(|w| {
            let bare: String = w.chars().filter(|c| c.is_alphanumeric()).collect();
            !FILLER_SET.contains(bare.to_lowercase().as_str())
        })
        .unwrap_or(0);
    let kept: Vec<&str> = raw[start..].iter().take(TITLE_WORDS).copied().collect();
    let mut title = kept.join(" ");
    title = title
        .trim_end_matches(|c: char| !c.is_alphanumeric())
        .to_string();
    if title.is_empty() {
        return "Untitled conversation".to_string();
    }
    upper_first(&title)
}

fn overview(sentences: &[String], words: &[Vec<String>]) -> String {
    let content: Vec<Vec<&str>> = words
        .iter()
        .map(|sentence| {
            sentence
                .iter()
                .map(String::as_str)
                .filter(|w| !STOP_SET.contains(w))
                .collect()
        })
        .collect();
    let mut frequency: HashMap<&str, usize> = HashMap::new();
    for word in content.iter().flatten() {
        *frequency.entry(word).or_default() += 1;
    }
    let mut scored: Vec<(usize, f64)> = content
        .iter()
        .enumerate()
        .map(|(index, content)| {
            let score = if content.is_empty() {
                0.0
            } else {
                content.iter().map(|w| frequency[w] as f64).sum::<f64>() / content.len() as f64
            };
            (index, score)
        })
        .collect();
    // Highest score first; the earlier sentence wins a tie, so the result is deterministic.
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut chosen: Vec<usize> = scored
        .iter()
        .take(OVERVIEW_SENTENCES)
        .map(|(i, _)| *i)
        .collect();
    chosen.sort_unstable();
    chosen
        .iter()
        .map(|&i| with_period(&sentences[i]))
        .collect::<Vec<_>>()
        .join(" ")
}

fn action_items(sentences: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut items = Vec::new();
    for sentence in sentences {
        let lower = format!("{} ", sentence.to_lowercase().replace('’', "'"));
        let Some(at) = COMMITMENTS
            .iter()
            .filter_map(|c| find_phrase(&lower, c))
            .min()
        else {
            continue;
        };
        // The item starts at the commitment: "So, I will send it" -> "I will send it".
        let item = upper_first(sentence[at..].trim_end_matches(['.', '!', '?']).trim());
        if seen.insert(item.to_lowercase()) {
            items.push(item);
            if items.len() == MAX_ACTION_ITEMS {
                break;
            }
        }
    }
    items
}

/// Byte offset of `phrase` in `lower` where it starts a word.
fn find_phrase(lower: &str, phrase: &str) -> Option<usize> {
    lower.match_indices(phrase).map(|(i, _)| i).find(|&i| {
        i == 0
            || !lower[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '\'')
    })
}

fn category(words: &[Vec<String>]) -> &'static str {
    let mut hits = [0usize; CATEGORIES.len()];
    for word in words.iter().flatten() {
        for &index in KEYWORDS.get(word.as_str()).into_iter().flatten() {
            hits[index] += 1;
        }
    }
    let mut best = ("other", 0usize);
    for ((name, _), hits) in CATEGORIES.iter().zip(hits) {
        if hits > best.1 {
            best = (name, hits);
        }
    }
    best.0
}

fn upper_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn with_period(s: &str) -> String {
    if s.ends_with(['.', '!', '?']) {
        s.to_string()
    } else {
        format!("{s}.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript(lines: &[&str]) -> Vec<Segment> {
        lines
            .iter()
            .enumerate()
            .map(|(i, text)| Segment {
                text: text.to_string(),
                speaker: format!("SPEAKER_{}", i % 2),
                start: i as f64 * 5.0,
                end: i as f64 * 5.0 + 4.0,
                is_user: i % 2 == 0,
            })
            .collect()
    }

    fn structured(segments: &[Segment]) -> Structured {
        structure(segments).structured
    }

    #[test]
    fn work_meeting() {
        let out = structured(&transcript(&[
            "So, the release planning meeting for the mobile project.",
            "The client moved the deadline to Friday. The release needs QA sign-off first.",
            "I will update the release notes tonight.",
            "We need to book a meeting with the client on Monday.",
            "Okay, sounds good.",
        ]));
        assert_eq!(
            out.title,
            "The release planning meeting for the mobile project"
        );
        assert_eq!(out.category, "work");
        assert_eq!(
            out.action_items,
            vec![
                "I will update the release notes tonight",
                "We need to book a meeting with the client on Monday",
            ]
        );
        assert_eq!(
            out.overview,
            // Average content-word frequency: 1.6, 1.5 and 1.4 beat "The release needs QA
            // sign-off first" (1.33) and the rest.
            "So, the release planning meeting for the mobile project. \
             I will update the release notes tonight. \
             We need to book a meeting with the client on Monday."
        );
    }

    #[test]
    fn errands_with_mixed_commitments() {
        let out = structured(&transcript(&[
            "um hey, did you call the doctor about the appointment?",
            "Yes. Remember to pick up the medicine after work.",
            "Let's also buy groceries on the way. Don't forget to get milk!",
            "let's also buy groceries on the way",
        ]));
        assert_eq!(out.title, "Did you call the doctor about the appointment");
        // buy ×2, groceries ×2, milk beat doctor, appointment, medicine.
        assert_eq!(out.category, "shopping");
        assert_eq!(
            out.action_items,
            vec![
                "Remember to pick up the medicine after work",
                "Let's also buy groceries on the way",
                "Don't forget to get milk",
            ],
            "the repeated commitment appears once"
        );
    }

    #[test]
    fn commitment_inside_a_word_is_not_one() {
        let out = structured(&transcript(&[
            "The village will host it. Toilets need cleaning.",
        ]));
        assert!(out.action_items.is_empty(), "{:?}", out.action_items);
    }

    #[test]
    fn empty_and_punctuation_only_transcripts_are_untitled() {
        for segments in [vec![], transcript(&["", "  ", "...", "?!"])] {
            let out = structured(&segments);
            assert_eq!(out.title, "Untitled conversation");
            assert_eq!(out.overview, "");
            assert!(out.action_items.is_empty());
            assert_eq!(out.category, "other");
        }
    }

    #[test]
    fn output_is_deterministic() {
        let input = transcript(&["We should plan the trip. The flight and hotel are booked."]);
        let first = structured(&input);
        for _ in 0..10 {
            assert_eq!(structured(&input), first);
        }
        assert_eq!(first.category, "travel");
    }

    #[test]
    fn long_first_sentence_is_cut_to_eight_words() {
        let out = structured(&transcript(&[
            "okay one two three four five six seven eight nine ten",
        ]));
        assert_eq!(out.title, "One two three four five six seven eight");
    }

    #[test]
    fn noise_is_discarded_and_talk_is_kept() {
        assert!(structure(&transcript(&["uh", "hmm, okay"])).discard);
        assert!(structure(&transcript(&[])).discard);
        assert!(structure(&transcript(&["yeah yeah", "okay so"])).discard);
        assert!(!structure(&transcript(&["Call the bank", "tomorrow"])).discard);
    }

    #[tokio::test(start_paused = true)]
    async fn builtin_waits_its_simulated_latency_then_structures() {
        let request = ProcessConversation {
            conversation_id: "c1".into(),
            segments: transcript(&["We should plan the trip."]),
            ..Default::default()
        };
        let builtin = Builtin {
            simulated_latency: Duration::from_secs(2),
        };
        let started = tokio::time::Instant::now();
        let answer = builtin.structure(&request).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(answer, structure(&request.segments));
    }
}
