//! A chain name held inline: no allocation, no reference count, and comparing two names reads no other
//! memory.
//!
//! A full render names 110,000 chains at 10,000 Services, and a ruleset holds each name in its service port's
//! part and in the table's map; as shared heap strings they cost an allocation and a free apiece, and sorting
//! them went to a separate allocation per comparison. iptables limits chain names to 28 bytes, and ours are at
//! most 25 (`KUBE-SEP-` and 16 hash characters), one more than the small-string crates we use keep inline, so
//! this type keeps up to 30 bytes in place. A longer name (only a chain some other program created through
//! nf_tables could have one) is shared from the heap instead.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

/// Bytes a name can have and still be held inline: the whole type is 32 bytes, the size of two pointers and
/// the shared fallback's length.
const INLINE: usize = 30;

/// A chain name. Orders, compares and hashes as its text does, so maps keyed by it are searched with a `&str`.
#[derive(Clone)]
pub struct ChainName(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Arc<str>),
}

impl ChainName {
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Always a whole `str` copied in, so this never fails; checked because checking costs a pass over
            // at most 30 bytes and the crate forbids unsafe code.
            Repr::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).expect("a chain name is built from a str")
            }
            Repr::Shared(text) => text,
        }
    }

    /// The name's bytes, without the check [`ChainName::as_str`] makes: what ordering and equality use.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(text) => text.as_bytes(),
        }
    }
}

impl From<&str> for ChainName {
    fn from(text: &str) -> Self {
        if text.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            ChainName(Repr::Inline {
                len: text.len() as u8,
                bytes,
            })
        } else {
            ChainName(Repr::Shared(Arc::from(text)))
        }
    }
}

impl From<&String> for ChainName {
    fn from(text: &String) -> Self {
        ChainName::from(text.as_str())
    }
}

impl From<String> for ChainName {
    fn from(text: String) -> Self {
        ChainName::from(text.as_str())
    }
}

impl Deref for ChainName {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for ChainName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for ChainName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for ChainName {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for ChainName {}

impl PartialEq<str> for ChainName {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for ChainName {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

// Byte order is `str` order, which `Borrow<str>` requires.
impl Ord for ChainName {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl PartialOrd for ChainName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

// As `str` hashes, which `Borrow<str>` requires of hashed maps.
impl Hash for ChainName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for ChainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ChainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    #[test]
    fn holds_our_names_inline_and_longer_ones_shared() {
        assert_eq!(std::mem::size_of::<ChainName>(), 32);
        let sep = ChainName::from("KUBE-SEP-ABCDEFGHIJKLMNOP");
        assert!(matches!(sep.0, Repr::Inline { .. }));
        let longest = "X".repeat(INLINE);
        assert!(matches!(ChainName::from(longest.as_str()).0, Repr::Inline { .. }));
        let long = "Y".repeat(INLINE + 1);
        let shared = ChainName::from(long.as_str());
        assert!(matches!(shared.0, Repr::Shared(_)));
        assert_eq!(&*shared, long);
        assert_eq!(&*sep, "KUBE-SEP-ABCDEFGHIJKLMNOP");
        assert_eq!(ChainName::from(""), "");
    }

    #[test]
    fn orders_and_finds_as_its_text() {
        let texts = [
            "KUBE-SVC-B",
            "KUBE-SVC",
            "KUBE-SEP-Z",
            "é-chain",
            "",
            &"Z".repeat(40),
            "KUBE-SVC-A",
        ];
        let mut names: Vec<ChainName> = texts.iter().map(|t| ChainName::from(*t)).collect();
        names.sort();
        let mut sorted = texts.to_vec();
        sorted.sort();
        assert_eq!(names.iter().map(|n| n.as_str()).collect::<Vec<_>>(), sorted);

        let tree: BTreeMap<ChainName, usize> =
            texts.iter().enumerate().map(|(i, t)| ((*t).into(), i)).collect();
        let hashed: HashMap<ChainName, usize> =
            texts.iter().enumerate().map(|(i, t)| ((*t).into(), i)).collect();
        for (i, t) in texts.iter().enumerate() {
            assert_eq!(tree.get(*t), Some(&i));
            assert_eq!(hashed.get(*t), Some(&i));
        }
    }
}
