//! Docker layer ids and the Ceph names derived from them.
//!
//! Every name docker-rbd gives an RBD image or a RADOS object derives from a
//! validated [`LayerId`], behind a fixed prefix, so that nothing a client
//! sends can name an object we do not own, and `rbd ls` users can tell our
//! images apart at a glance.

use std::fmt;

/// Why a string is not a layer id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid layer id {id:?}: {reason}")]
pub struct InvalidLayerId {
    /// What was sent (truncated to 100 characters).
    pub id: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A layer id: what Docker's own drivers accept, a name that could be a
/// file name: 1 to 255 bytes, no `/` and no NUL, not `.` or `..`.
///
/// dockerd's own layer and mount ids are 64 hex digits (`<mount id>-init`
/// for a container's init layer); BuildKit's build snapshots are 25
/// base-36 characters; Docker's driver tests use names such as `Base`.
/// Ids reach RBD image names and file names only through
/// [`LayerId::encoded`] and [`LayerId::file_name`], which keep to
/// lowercase letters, digits, `-` and `_`, so an id can never smuggle a
/// `/`, `@`, `.` or space into an image, object or path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerId(String);

/// Longest [`LayerId`] in bytes (a file name's limit).
pub const MAX_LAYER_ID_LEN: usize = 255;

/// Longest [`LayerId::file_name`] that is the encoded id itself; longer
/// ones are hashed.
const MAX_FILE_NAME: usize = 200;

impl LayerId {
    /// Validates `id`.
    pub fn parse(id: &str) -> Result<Self, InvalidLayerId> {
        let err = |reason| InvalidLayerId {
            id: id.chars().take(100).collect(),
            reason,
        };
        if id.is_empty() {
            return Err(err("empty"));
        }
        if id.len() > MAX_LAYER_ID_LEN {
            return Err(err("longer than 255 bytes"));
        }
        if id == "." || id == ".." {
            return Err(err("not a name (. or ..)"));
        }
        if id.contains('/') {
            return Err(err("contains '/'"));
        }
        if id.contains('\0') {
            return Err(err("contains a NUL byte"));
        }
        Ok(Self(id.to_string()))
    }

    /// Validates an optional parent id: empty means none.
    pub fn parse_parent(parent: &str) -> Result<Option<Self>, InvalidLayerId> {
        if parent.is_empty() {
            Ok(None)
        } else {
            Self::parse(parent).map(Some)
        }
    }

    /// The id as Docker sent it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as it stands in RBD image names: itself when it is only
    /// lowercase letters, digits and `-` (every id dockerd and BuildKit
    /// send, so their images keep their names), else each other byte as
    /// `_` and two hex digits (`Base` is `_42ase`). Reversible
    /// ([`LayerId::from_encoded`]), and never the same for two ids.
    pub fn encoded(&self) -> String {
        let mut out = String::with_capacity(self.0.len());
        for b in self.0.bytes() {
            if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' {
                out.push(b as char);
            } else {
                out.push_str(&format!("_{b:02x}"));
            }
        }
        out
    }

    /// The id an [`LayerId::encoded`] form stands for; `None` if `text` is
    /// not one.
    pub fn from_encoded(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'_' => {
                    let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                    if hex.bytes().any(|b| b.is_ascii_uppercase()) {
                        return None;
                    }
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 3;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        let id = Self::parse(&String::from_utf8(out).ok()?).ok()?;
        // Only the canonical spelling: one name, one id.
        (id.encoded() == text).then_some(id)
    }

    /// The name of the layer's directories under the Home: the encoded
    /// id, or when that is longer than 200 characters `_h` and the
    /// id's SHA-256 (a form the encoding never makes).
    pub fn file_name(&self) -> String {
        let encoded = self.encoded();
        if encoded.len() <= MAX_FILE_NAME {
            encoded
        } else {
            format!("_h{}", crate::digest::sha256_hex(self.0.as_bytes()))
        }
    }

    /// The id of the shared init layer over image layer `parent` holding
    /// the init files whose fingerprint is `fingerprint`: `s` and 59 hex
    /// digits of their SHA-256, then `-init`. Never a dockerd id (those are
    /// 64 characters before `-init`), and the same on every host.
    pub fn shared_init(parent: &LayerId, fingerprint: &str) -> Self {
        let digest = crate::digest::sha256_hex(format!("{parent}\0{fingerprint}").as_bytes());
        Self(format!("s{}-init", &digest[..59]))
    }

    /// Whether this is a container `-init` layer.
    pub fn is_init(&self) -> bool {
        self.0.ends_with("-init")
    }

    /// A short form for humans (the first 12 characters, like `docker ps`).
    pub fn short(&self) -> &str {
        let end = self
            .0
            .char_indices()
            .nth(12)
            .map_or(self.0.len(), |(i, _)| i);
        &self.0[..end]
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a host id: 1 to 63 ASCII letters, digits, `-` or `_`, so it can
/// stand in RADOS object names (`<prefix>host.<id>`) and lock cookies.
pub fn check_host_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 63 {
        return Err(format!("host id {id:?} is not 1 to 63 characters"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "host id {id:?} has characters other than letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

/// The default host id: `/etc/machine-id` (32 hex digits, stable across a
/// wiped data root and a reinstalled docker-rbd), else the host name with
/// every character a host id cannot carry replaced by `-`.
pub fn default_host_id(machine_id: Option<&str>, hostname: &str) -> String {
    if let Some(id) = machine_id.map(str::trim)
        && check_host_id(id).is_ok()
    {
        return id.to_string();
    }
    let cleaned: String = hostname
        .chars()
        .take(63)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "host".to_string()
    } else {
        cleaned
    }
}

/// Name of the single snapshot a layer gets when it is sealed (its first
/// child is created). Children are clones of `<image>@sealed`.
pub const SEALED_SNAP: &str = "sealed";

/// How docker-rbd names things in a pool and namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    prefix: String,
}

impl Naming {
    /// Default image prefix.
    pub const DEFAULT_PREFIX: &'static str = "docker-rbd.";

    /// Checks that `prefix` can lead an RBD image name: non-empty, at most 32
    /// characters of `[A-Za-z0-9._-]`.
    pub fn new(prefix: &str) -> Result<Self, String> {
        if prefix.is_empty() || prefix.len() > 32 {
            return Err(format!(
                "image prefix {prefix:?} must be 1 to 32 characters"
            ));
        }
        if !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(format!(
                "image prefix {prefix:?} may only hold letters, digits, '.', '_' and '-'"
            ));
        }
        Ok(Self {
            prefix: prefix.to_string(),
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// RBD image of a layer: `<prefix>layer.<encoded id>`
    /// ([`LayerId::encoded`]).
    pub fn layer_image(&self, id: &LayerId) -> String {
        format!("{}layer.{}", self.prefix, id.encoded())
    }

    /// The layer id an image name belongs to, if it is one of our layer
    /// images.
    pub fn layer_of_image(&self, image: &str) -> Option<LayerId> {
        let rest = image.strip_prefix(&self.prefix)?.strip_prefix("layer.")?;
        LayerId::from_encoded(rest)
    }

    /// RBD image holding the formatted base filesystem every parentless
    /// layer is cloned from: `<prefix>base.<fs>.<size in bytes>`, so a change
    /// of filesystem or base size makes a new base rather than reusing a
    /// mismatching one.
    pub fn base_image(&self, fs: &str, size: u64) -> String {
        format!("{}base.{fs}.{size}", self.prefix)
    }

    /// Whether `image` is one of our base images.
    pub fn is_base_image(&self, image: &str) -> bool {
        image
            .strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with("base."))
    }

    /// RADOS object whose cls lock serialises the making of base images.
    pub fn base_lock_object(&self) -> String {
        format!("{}base.lock", self.prefix)
    }

    /// Prefix of the RADOS objects of the metadata store.
    pub fn metadata_prefix(&self) -> &str {
        &self.prefix
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn host_ids() {
        assert!(check_host_id("node-01_a").is_ok());
        for bad in ["", "a.b", "a/b", "a b", &"x".repeat(64)] {
            assert!(check_host_id(bad).is_err(), "{bad:?}");
        }
        let mid = "4c4c4544004a3510804bb4c04f4b3232";
        assert_eq!(default_host_id(Some(&format!("{mid}\n")), "h"), mid);
        assert_eq!(default_host_id(None, "web.example.com"), "web-example-com");
        assert_eq!(default_host_id(Some(""), ""), "host");
    }

    #[test]
    fn accepts_docker_ids() {
        assert_eq!(LayerId::parse(HEX).unwrap().as_str(), HEX);
        let init = format!("{HEX}-init");
        let id = LayerId::parse(&init).unwrap();
        assert!(id.is_init());
        assert_eq!(id.short(), "0123456789ab");
    }

    #[test]
    fn accepts_buildkit_snapshot_ids() {
        // BuildKit's identity.NewID(): 25 base-36 characters.
        let id = LayerId::parse("q1w2e3r4t5y6u7i8o9p0asdfg").unwrap();
        assert!(!id.is_init());
        assert_eq!(id.short(), "q1w2e3r4t5y6");
        assert_eq!(LayerId::parse("ab").unwrap().short(), "ab");
    }

    #[test]
    fn accepts_what_dockers_own_drivers_accept() {
        // Docker's graphdriver tests use such ids.
        for id in [
            "Base", "Snap", "rbdTest", "a b", "a.b", "x@y", "日本", "-init", "...",
        ] {
            assert_eq!(LayerId::parse(id).unwrap().as_str(), id);
        }
        assert!(LayerId::parse(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn rejects_what_cannot_be_a_file_name() {
        for bad in [
            "",
            ".",
            "..",
            &format!("../{}", &HEX[3..]),
            &format!("{}/x", &HEX[2..]),
            "a\0b",
            &"x".repeat(256),
        ] {
            let err = LayerId::parse(bad).unwrap_err();
            assert!(err.to_string().contains("invalid layer id"), "{bad}: {err}");
        }
        assert_eq!(LayerId::parse_parent("").unwrap(), None);
    }

    #[test]
    fn encoding_keeps_todays_names_and_is_reversible() {
        let n = Naming::new(Naming::DEFAULT_PREFIX).unwrap();
        for today in [HEX, &format!("{HEX}-init"), "q1w2e3r4t5y6u7i8o9p0asdfg"] {
            let id = LayerId::parse(today).unwrap();
            assert_eq!(id.encoded(), today);
            assert_eq!(id.file_name(), today);
        }
        assert_eq!(LayerId::parse("Base").unwrap().encoded(), "_42ase");
        assert_eq!(LayerId::parse("a_b").unwrap().encoded(), "a_5fb");
        for id in [
            "Base",
            "a_b",
            "a b",
            "x@y.z",
            "日本",
            "_42ase",
            "...",
            &"Z".repeat(255),
        ] {
            let id = LayerId::parse(id).unwrap();
            let encoded = id.encoded();
            assert!(
                encoded.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'-'
                    || b == b'_'),
                "{encoded}"
            );
            assert_eq!(
                LayerId::from_encoded(&encoded),
                Some(id.clone()),
                "{encoded}"
            );
            assert_eq!(n.layer_of_image(&n.layer_image(&id)), Some(id.clone()));
            assert!(id.file_name().len() <= 200 + 2);
        }
        // Not the canonical spelling, or no encoding at all.
        for bad in ["_4", "_zz", "_4A", "_61", "a/b", "", "_2e"] {
            assert_eq!(LayerId::from_encoded(bad), None, "{bad}");
        }
        let long = LayerId::parse(&"Z".repeat(255)).unwrap();
        assert!(long.file_name().starts_with("_h"), "hashed when long");
        assert_eq!(
            LayerId::parse("日本日本日本日本日本日本日本")
                .unwrap()
                .short(),
            "日本日本日本日本日本日本"
        );
    }

    #[test]
    fn names_round_trip() {
        let n = Naming::new(Naming::DEFAULT_PREFIX).unwrap();
        let id = LayerId::parse(HEX).unwrap();
        let image = n.layer_image(&id);
        assert_eq!(image, format!("docker-rbd.layer.{HEX}"));
        assert_eq!(n.layer_of_image(&image), Some(id));
        assert_eq!(n.layer_of_image("other"), None);
        assert_eq!(n.base_image("ext4", 10), "docker-rbd.base.ext4.10");
        assert!(n.is_base_image("docker-rbd.base.ext4.10"));
        assert!(!n.is_base_image(&image));
    }

    #[test]
    fn prefix_is_checked() {
        assert!(Naming::new("").is_err());
        assert!(Naming::new("a/b").is_err());
        assert!(Naming::new("a@b").is_err());
        assert!(Naming::new(&"x".repeat(33)).is_err());
        assert!(Naming::new("team-a_").is_ok());
    }
}
