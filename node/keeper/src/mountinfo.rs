//! The mount table (`/proc/self/mountinfo`), read without touching the
//! mounts: `stat` on a FUSE mount whose server is away waits until one
//! answers, and the keeper's users must not.

use std::path::{Path, PathBuf};

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mounted filesystem's device number (`st_dev` of its files).
    pub device: u64,
    /// Where it is mounted.
    pub point: PathBuf,
    /// Per-mount options (`rw,nosuid,nodev,...`).
    pub options: String,
}

/// This process's mount table, in mount order.
pub fn read() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The device of what is mounted at `point` (the mount on top, when
/// several are stacked there).
pub fn device_of(point: &Path) -> Option<u64> {
    read()
        .into_iter()
        .rev()
        .find(|m| m.point == point)
        .map(|m| m.device)
}

/// Parses a mountinfo table.
pub fn parse(table: &str) -> Vec<Mount> {
    table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let device = fields.nth(2)?;
            let _root = fields.next()?;
            let point = fields.next()?;
            let options = fields.next()?;
            let (major, minor) = device.split_once(':')?;
            Some(Mount {
                device: makedev(major.parse().ok()?, minor.parse().ok()?),
                point: PathBuf::from(unescape(point)),
                options: options.to_string(),
            })
        })
        .collect()
}

/// `st_dev` of a major and minor number, as glibc's `makedev` builds it.
fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0x0000_0fff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0x0000_00ff)
}

/// mountinfo writes space, tab, newline and backslash as `\NNN` (octal).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = (bytes[i] == b'\\' && i + 3 < bytes.len())
            .then(|| u8::from_str_radix(&field[i + 1..i + 4], 8).ok())
            .flatten();
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn lines_give_devices_points_and_options() {
        let table = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw
98 22 0:52 / /var/lib/kubelet/pods/a/volumes/x rw,nodev shared:5 - fuse.shoal shoal:v rw
99 22 0:53 / /mnt/with\\040space rw - fuse.shoal shoal:w rw
100 98 259:70000 / /var/lib/kubelet/pods/a/volumes/x ro - fuse.shoal shoal:v rw
";
        let mounts = parse(table);
        assert_eq!(mounts.len(), 4);
        assert_eq!(mounts[1].options, "rw,nodev");
        assert_eq!(mounts[2].point, Path::new("/mnt/with space"));
        assert_eq!(mounts[2].device, makedev(0, 53));
        assert_eq!(mounts[3].device, makedev(259, 70000));
    }

    #[test]
    fn the_root_mount_has_the_device_stat_reports() {
        let dev = std::fs::metadata("/").unwrap().dev();
        assert_eq!(device_of(Path::new("/")), Some(dev));
    }
}
