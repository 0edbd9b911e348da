//! Configuration errors: each one names the file, line, column, key path and what is wrong.

use std::fmt;
use std::path::PathBuf;

use crate::validate::escape_controls;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (as given by the user).
    pub file: PathBuf,
    /// 1-based line; 0 when the problem is not tied to a place (e.g. the file cannot be read).
    pub line: usize,
    /// 1-based column; 0 when unknown.
    pub column: usize,
    /// Dotted key path, e.g. `service.echo.listen`; empty for file-level errors.
    pub key: String,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `FILE:LINE:COL: KEY: MESSAGE` (parts that are unknown are left out), always one line:
    /// control characters in any part (a newline in a file name or a message) are escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.to_string_lossy();
        write!(f, "{}", escape_controls(&file))?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", escape_controls(&self.key))?;
        }
        write!(f, ": {}", escape_controls(&self.message))
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found, never empty: the main file's in file order, then each drop-in's in
/// file order (drop-ins in the order they were read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    /// One error per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
