//! `/etc/services`: service names to port numbers, read from the file only (never NSS, never
//! the network).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::ImportError;

/// The name → port table of one `services(5)` file, for `tcp` and `udp`.
#[derive(Debug, Default)]
pub struct Services {
    path: PathBuf,
    ports: HashMap<(String, String), u16>,
}

impl Services {
    /// Reads `path`. `Err` when it cannot be read; lines that are not `name port/proto
    /// [aliases…]` are skipped, as libc does.
    pub fn load(path: &Path) -> Result<Services, ImportError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ImportError::file(path, format!("cannot read: {e}")))?;
        Ok(Services::parse(path, &text))
    }

    fn parse(path: &Path, text: &str) -> Services {
        let mut ports = HashMap::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut fields = line.split_whitespace();
            let (Some(name), Some(port_proto)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Some((port, proto)) = port_proto.split_once('/') else {
                continue;
            };
            let Ok(port) = port.parse::<u16>() else {
                continue;
            };
            for n in std::iter::once(name).chain(fields) {
                // The first line for a name wins, as in getservbyname().
                ports
                    .entry((n.to_string(), proto.to_string()))
                    .or_insert(port);
            }
        }
        Services {
            path: path.to_path_buf(),
            ports,
        }
    }

    /// The port of `service` over `proto` (`tcp` or `udp`): a number is taken as it is (1..=65535),
    /// a name is looked up. `Err` says what was not found and where it was looked for.
    pub fn port(&self, service: &str, proto: &str) -> Result<u16, String> {
        if service.bytes().all(|b| b.is_ascii_digit()) {
            return match service.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(format!("port {service} is out of range 1..=65535")),
            };
        }
        self.ports
            .get(&(service.to_string(), proto.to_string()))
            .copied()
            .ok_or_else(|| {
                format!(
                    "service {service}/{proto} is not in {} (write the port number)",
                    self.path.display()
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_aliases_and_numbers() {
        let s = Services::parse(
            Path::new("services"),
            "# c\necho 7/tcp\necho 7/udp\nwww 80/tcp http # web\nbad x/tcp\n",
        );
        assert_eq!(s.port("echo", "udp"), Ok(7));
        assert_eq!(s.port("http", "tcp"), Ok(80));
        assert_eq!(s.port("8080", "tcp"), Ok(8080));
        assert!(s.port("www", "udp").unwrap_err().contains("www/udp"));
        assert!(s.port("0", "tcp").is_err());
    }
}
