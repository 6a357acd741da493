//! Checks and translations of CSI requests, as plain functions: what the
//! specification requires of each field, and how CSI names and sizes map
//! onto Shoal's.

use std::collections::HashMap;

use shoal_core::fs::volume::check_name;
use shoal_core::placement::FailureDomain;
use shoal_proto::csi_v1::volume_capability::AccessType;
use shoal_proto::csi_v1::volume_capability::access_mode::Mode;
use shoal_proto::csi_v1::{CapacityRange, VolumeCapability};
use tonic::Status;

/// Size of a volume whose request names no capacity.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// The filesystem types a mount capability may name.
const FS_TYPES: [&str; 3] = ["", "shoal", "fuse.shoal"];
/// Parameter keys the external provisioner adds for itself.
const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";

/// A required string field.
pub fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// The Shoal name for a CSI name (of a volume or a snapshot): the name
/// itself when Shoal accepts it (Kubernetes' `pvc-<uid>` and
/// `snapshot-<uid>` do), else a stable digest of it. Deterministic, so a
/// repeated request finds what the first one made.
pub fn shoal_name(csi_name: &str, kind: &str) -> Result<String, Status> {
    if csi_name.len() > 128 {
        return Err(Status::invalid_argument(format!(
            "{kind} name is {} bytes; at most 128",
            csi_name.len()
        )));
    }
    if csi_name
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(Status::invalid_argument(format!(
            "{kind} name {csi_name:?} holds control characters"
        )));
    }
    Ok(if check_name(csi_name).is_ok() {
        csi_name.to_string()
    } else {
        let digest = blake3::hash(csi_name.as_bytes());
        format!("{kind}-{}", &hex::encode(digest.as_bytes())[..40])
    })
}

/// An id the CO passes back: it must be one Shoal could have issued.
pub fn id<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    required(value, field)?;
    check_name(value)
        .map_err(|e| Status::not_found(format!("{field} {value:?} names nothing: {e}")))?;
    Ok(value)
}

/// The size to provision for a capacity range: the least it requires,
/// or the default within its limit.
pub fn size(range: Option<&CapacityRange>) -> Result<u64, Status> {
    let Some(range) = range else {
        return Ok(DEFAULT_SIZE);
    };
    if range.required_bytes < 0 || range.limit_bytes < 0 {
        return Err(Status::invalid_argument(
            "capacity_range bytes may not be negative",
        ));
    }
    let (required, limit) = (range.required_bytes as u64, range.limit_bytes as u64);
    if limit != 0 && required > limit {
        return Err(Status::out_of_range(format!(
            "required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    Ok(match (required, limit) {
        (0, 0) => DEFAULT_SIZE,
        (0, limit) => DEFAULT_SIZE.min(limit),
        (required, _) => required,
    })
}

/// Whether an existing volume of `size` bytes satisfies `range`.
pub fn fits(size: u64, range: Option<&CapacityRange>) -> bool {
    range.is_none_or(|r| {
        size >= r.required_bytes.max(0) as u64
            && (r.limit_bytes <= 0 || size <= r.limit_bytes as u64)
    })
}

/// Checks one volume capability: Shoal serves filesystems (not block
/// devices) in every access mode.
pub fn capability(cap: &VolumeCapability) -> Result<Mode, Status> {
    match &cap.access_type {
        Some(AccessType::Mount(mount)) => {
            if !FS_TYPES.contains(&mount.fs_type.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "fs_type {:?} is not offered: Shoal volumes are shoal filesystems",
                    mount.fs_type
                )));
            }
        }
        Some(AccessType::Block(_)) => {
            return Err(Status::invalid_argument(
                "block access is not offered: Shoal volumes are filesystems",
            ));
        }
        None => {
            return Err(Status::invalid_argument(
                "volume capability names no access type (mount or block)",
            ));
        }
    }
    let mode = cap
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    if mode == Mode::Unknown {
        return Err(Status::invalid_argument(
            "volume capability needs an access mode",
        ));
    }
    Ok(mode)
}

/// Checks a list of capabilities, which must not be empty.
pub fn capabilities(caps: &[VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    caps.iter().try_for_each(|c| capability(c).map(|_| ()))
}

/// Whether a mode publishes the volume read-only.
pub fn read_only(mode: Mode) -> bool {
    matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
}

/// Whether a mode allows the volume only one target on a node.
pub fn single_target(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeReaderOnly
    )
}

/// What a StorageClass may ask of a volume.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parameters {
    pub replicas: Option<u32>,
    pub failure_domain: Option<FailureDomain>,
}

pub fn parameters(params: &HashMap<String, String>) -> Result<Parameters, Status> {
    let mut out = Parameters::default();
    for (key, value) in params {
        match key.as_str() {
            "replicas" => {
                let r: u32 = value.parse().map_err(|_| {
                    Status::invalid_argument(format!("replicas {value:?} is not a number"))
                })?;
                if !(1..=7).contains(&r) {
                    return Err(Status::invalid_argument(format!(
                        "replicas must be between 1 and 7, not {r}"
                    )));
                }
                out.replicas = Some(r);
            }
            "failureDomain" => {
                out.failure_domain = Some(value.parse().map_err(Status::invalid_argument)?)
            }
            k if k.starts_with(PROVISIONER_PREFIX) => {}
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown parameter {other:?}: Shoal takes replicas and failureDomain"
                )));
            }
        }
    }
    Ok(out)
}

/// How far apart a failure domain keeps replicas: host < rack < zone.
pub fn spread(domain: FailureDomain) -> u8 {
    match domain {
        FailureDomain::Host => 0,
        FailureDomain::Rack => 1,
        FailureDomain::Zone => 2,
    }
}

/// One page of a sorted list: entries from the token on (a token is the
/// first name of the page), at most `max` of them (0: all), and the token
/// of the next page.
pub fn page<T>(
    mut items: Vec<T>,
    name: impl Fn(&T) -> &str,
    token: &str,
    max: i32,
) -> Result<(Vec<T>, String), Status> {
    if max < 0 {
        return Err(Status::invalid_argument("max_entries may not be negative"));
    }
    if !token.is_empty() && check_name(token).is_err() {
        return Err(Status::aborted(format!(
            "starting_token {token:?} is not one this driver issued"
        )));
    }
    items.sort_by(|a, b| name(a).cmp(name(b)));
    let start = items.partition_point(|i| name(i) < token);
    let mut rest = items.split_off(start);
    let next = if max > 0 && rest.len() > max as usize {
        let tail = rest.split_off(max as usize);
        name(&tail[0]).to_string()
    } else {
        String::new()
    };
    Ok((rest, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::csi_v1::volume_capability::{AccessMode, BlockVolume, MountVolume};
    use tonic::Code;

    fn cap(access: Option<AccessType>, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: access,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        }))
    }

    #[test]
    fn names_map_stably_onto_shoal_names() {
        assert_eq!(shoal_name("pvc-1234-abcd", "v").unwrap(), "pvc-1234-abcd");
        let odd = shoal_name("My Volume/1", "v").unwrap();
        assert!(odd.starts_with("v-") && check_name(&odd).is_ok());
        assert_eq!(odd, shoal_name("My Volume/1", "v").unwrap());
        assert_ne!(odd, shoal_name("My Volume/2", "v").unwrap());
        assert_eq!(
            shoal_name("a\u{1}b", "v").unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            shoal_name(&"a".repeat(129), "v").unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn capacity_ranges() {
        let r = |required, limit| CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        };
        assert_eq!(size(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size(Some(&r(5 << 20, 0))).unwrap(), 5 << 20);
        assert_eq!(size(Some(&r(0, 1 << 20))).unwrap(), 1 << 20);
        assert_eq!(size(Some(&r(0, 0))).unwrap(), DEFAULT_SIZE);
        assert_eq!(size(Some(&r(10, 5))).unwrap_err().code(), Code::OutOfRange);
        assert_eq!(
            size(Some(&r(-1, 0))).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert!(fits(10, Some(&r(10, 10))));
        assert!(fits(10, Some(&r(5, 0))));
        assert!(!fits(10, Some(&r(11, 0))));
        assert!(!fits(10, Some(&r(0, 9))));
    }

    #[test]
    fn capabilities_are_checked() {
        assert_eq!(
            capability(&cap(mount(""), Mode::MultiNodeMultiWriter)).unwrap(),
            Mode::MultiNodeMultiWriter
        );
        assert!(capability(&cap(mount("fuse.shoal"), Mode::SingleNodeWriter)).is_ok());
        for bad in [
            cap(mount("ext4"), Mode::SingleNodeWriter),
            cap(
                Some(AccessType::Block(BlockVolume {})),
                Mode::SingleNodeWriter,
            ),
            cap(None, Mode::SingleNodeWriter),
            cap(mount(""), Mode::Unknown),
        ] {
            assert_eq!(capability(&bad).unwrap_err().code(), Code::InvalidArgument);
        }
        assert_eq!(capabilities(&[]).unwrap_err().code(), Code::InvalidArgument);
        assert!(read_only(Mode::MultiNodeReaderOnly) && !read_only(Mode::MultiNodeMultiWriter));
    }

    #[test]
    fn parameters_are_checked() {
        let p = |pairs: &[(&str, &str)]| {
            parameters(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert_eq!(
            p(&[
                ("replicas", "2"),
                ("failureDomain", "rack"),
                ("csi.storage.k8s.io/pvc/name", "x")
            ])
            .unwrap(),
            Parameters {
                replicas: Some(2),
                failure_domain: Some(FailureDomain::Rack)
            }
        );
        for bad in [
            &[("replicas", "0")][..],
            &[("replicas", "many")],
            &[("failureDomain", "planet")],
            &[("colour", "blue")],
        ] {
            assert_eq!(p(bad).unwrap_err().code(), Code::InvalidArgument);
        }
    }

    #[test]
    fn pages_walk_a_list_once() {
        let names: Vec<String> = (0..25).map(|i| format!("v{i:02}")).collect();
        let mut seen = Vec::new();
        let mut token = String::new();
        for _ in 0..10 {
            let (page, next) = page(names.clone(), |s| s, &token, 10).unwrap();
            assert!(page.len() <= 10);
            seen.extend(page);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, names);
        assert_eq!(page(names.clone(), |s| s, "", 0).unwrap().0.len(), 25);
        assert_eq!(
            page(names.clone(), |s| s, "Bad Token", 1)
                .unwrap_err()
                .code(),
            Code::Aborted
        );
        assert_eq!(
            page(names, |s| s, "", -1).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
