//! The list of problems a configuration has. Shared by the gateway's
//! configuration and `[commands]`; a leaf module.

/// Every problem found in a configuration, one line each.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    /// Records a problem at `at` (a dotted key path).
    pub fn push(&mut self, at: impl AsRef<str>, msg: impl AsRef<str>) {
        self.0.push(format!("{}: {}", at.as_ref(), msg.as_ref()));
    }
}

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}
