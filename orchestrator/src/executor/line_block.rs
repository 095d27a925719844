//! [`LineBlock`]: the lines an executor read from one stream at once, kept as one string, so a
//! flood of output costs one allocation and one channel message per read instead of per line.

/// Lines of one stream, in order: their texts back to back and where each ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineBlock {
    text: String,
    ends: Vec<usize>,
}

impl LineBlock {
    /// Appends a line (its text, without terminator).
    pub fn push(&mut self, line: &str) {
        self.text.push_str(line);
        self.ends.push(self.text.len());
    }

    /// Number of lines.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The lines, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let line = &self.text[start..end];
            start = end;
            line
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_lines_apart() {
        let mut b = LineBlock::default();
        assert!(b.is_empty());
        for line in ["a", "", "héllo", "b"] {
            b.push(line);
        }
        assert_eq!(b.len(), 4);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec!["a", "", "héllo", "b"]);
    }
}
