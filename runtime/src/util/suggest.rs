//! "Did you mean …?" for misspelled names in pipeline files, aggregate
//! calls and expressions.

/// The closest candidate to a misspelled `word`, if one is close enough:
/// at most 2 edits (a third of a longer name), and fewer edits than the
/// candidate has letters.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3) && *d < c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::suggest;

    #[test]
    fn near_names_are_suggested_far_ones_are_not() {
        let names = ["source", "steps", "sink"];
        assert_eq!(suggest("sorce", names), Some("source"));
        assert_eq!(suggest("stpes", names), Some("steps"));
        assert_eq!(suggest("banana", names), None);
        assert_eq!(suggest("x", ["y"]), None);
    }
}
