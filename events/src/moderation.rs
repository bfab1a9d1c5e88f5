//! The prompt deny-list: categories of terms a prompt may not contain.

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Default)]
pub struct DenyList {
    /// (category, normalized term words)
    entries: Vec<(String, Vec<String>)>,
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

impl DenyList {
    /// Parse `category: term` lines; `#` starts a comment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (category, term) = line
                .split_once(':')
                .ok_or_else(|| format!("line {}: expected `category: term`", i + 1))?;
            let category = category.trim();
            let term = words(term);
            if category.is_empty() || term.is_empty() {
                return Err(format!("line {}: empty category or term", i + 1));
            }
            entries.push((category.to_owned(), term));
        }
        Ok(Self { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The category of the first term the prompt contains, as whole words.
    pub fn check(&self, prompt: &str) -> Option<&str> {
        let text = words(prompt);
        self.entries
            .iter()
            .find(|(_, term)| text.windows(term.len()).any(|w| w == term.as_slice()))
            .map(|(c, _)| c.as_str())
    }
}

/// The hex SHA-256 of a prompt: what is kept of a rejected one.
pub fn prompt_sha256(prompt: &str) -> String {
    hex::encode(Sha256::digest(prompt.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_whole_words_case_insensitively() {
        let d = DenyList::parse("# c\nviolence: behead\nweapons: pipe bomb\n").unwrap();
        assert_eq!(d.check("How to BEHEAD a statue"), Some("violence"));
        assert_eq!(d.check("a pipe-bomb"), Some("weapons"));
        assert_eq!(d.check("beheaded"), None);
        assert_eq!(d.check("a pipe and a bomb"), None);
        assert!(DenyList::parse("no colon here").is_err());
    }
}
