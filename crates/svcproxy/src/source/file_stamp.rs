//! What tells one version of a file from another without reading it again: the file a name leads to (device
//! and inode, so a rename over it or a ConfigMap volume's symlink swap shows) and when and how its content
//! last changed (an in-place write shows). A manifest directory read compares these before and after to know
//! that no file changed while it was being read.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    pub fn of(meta: &Metadata) -> Self {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The stamp of the file `path` leads to now (symlinks followed), `None` if there is none.
    pub fn now(path: &Path) -> Option<Self> {
        std::fs::metadata(path).ok().map(|m| FileStamp::of(&m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn a_rename_over_a_file_or_a_write_in_place_changes_its_stamp_and_a_read_does_not() {
        let dir = std::env::temp_dir().join(format!("svcproxy-file-stamp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.yaml");
        fs::write(&file, "one").unwrap();
        let first = FileStamp::now(&file).unwrap();
        let _ = fs::read_to_string(&file).unwrap();
        assert_eq!(FileStamp::now(&file), Some(first));

        // Same length, so only the inode tells the versions apart.
        fs::write(dir.join(".a.tmp"), "two").unwrap();
        fs::rename(dir.join(".a.tmp"), &file).unwrap();
        let renamed = FileStamp::now(&file).unwrap();
        assert_ne!(renamed, first);

        // Another length: two writes within one clock tick may leave the same times on filesystems
        // without fine-grained timestamps.
        fs::write(&file, "three").unwrap();
        assert_ne!(FileStamp::now(&file).unwrap(), renamed);

        fs::remove_file(&file).unwrap();
        assert_eq!(FileStamp::now(&file), None);
        let _ = fs::remove_dir_all(&dir);
    }
}
