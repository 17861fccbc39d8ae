//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to find where
//! a struct's member lies: the `cgroup_mkdir` watch reads kernel structures
//! at offsets that vary with the kernel's build, and Rust programs have no
//! CO-RE relocations to do it for them.
use std::collections::HashMap;

use envguard_common::config::CgroupOffsets;

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

struct Type {
    name: u32,
    kind: u32,
    kind_flag: bool,
    /// `size` or `type`, by kind.
    size_or_type: u32,
    /// Struct and union members: (name, type, bit offset).
    members: Vec<(u32, u32, u32)>,
}

/// The types of one BTF blob.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, String> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))?;
        Btf::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, String> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| format!("BTF cut short at byte {o}"))
        };
        if u16_at(0) != Some(MAGIC) {
            return Err("not little-endian BTF".into());
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or("BTF string section out of bounds")?
            .to_vec();
        // Type id 0 is `void`.
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            kind_flag: false,
            size_or_type: 0,
            members: Vec::new(),
        }];
        let mut at = hdr_len + type_off;
        let end = at + type_len;
        while at < end {
            let (name, info, size_or_type) = (u32_at(at)?, u32_at(at + 4)?, u32_at(at + 8)?);
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let mut members = Vec::new();
            at += match kind {
                KIND_INT | 14 | 17 => 4, // INT, VAR, DECL_TAG
                3 => 12,                 // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + 12 * i;
                        members.push((u32_at(m)?, u32_at(m + 4)?, u32_at(m + 8)?));
                    }
                    12 * vlen
                }
                KIND_ENUM | 13 => 8 * vlen,    // ENUM, FUNC_PROTO
                15 | KIND_ENUM64 => 12 * vlen, // DATASEC, ENUM64
                _ => 0,
            };
            types.push(Type {
                name,
                kind,
                kind_flag: info >> 31 == 1,
                size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            structs: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name != 0 {
                btf.structs
                    .entry(btf.name(t.name).to_owned())
                    .or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let len = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..len]).unwrap_or("")
    }

    /// Byte offset and size of `strukt.member`, looking through anonymous
    /// structs and unions; `None` for a bitfield or what is not there.
    pub fn member(&self, strukt: &str, member: &str) -> Option<(u32, u32)> {
        let id = *self.structs.get(strukt)?;
        let (bits, ty) = self.find(id, member, 0)?;
        if bits % 8 != 0 {
            return None;
        }
        Some((bits / 8, self.size(ty)?))
    }

    fn find(&self, id: u32, member: &str, base: u32) -> Option<(u32, u32)> {
        let t = self.types.get(id as usize)?;
        for &(name, ty, offset) in &t.members {
            let bits = if t.kind_flag {
                if offset >> 24 != 0 {
                    continue; // a bitfield
                }
                offset & 0xff_ffff
            } else {
                offset
            };
            if name == 0 {
                let inner = self.resolve(ty);
                if let Some(found) = self.find(inner, member, base + bits) {
                    return Some(found);
                }
            } else if self.name(name) == member {
                return Some((base + bits, ty));
            }
        }
        None
    }

    /// Through typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type;
                }
                _ => break,
            }
        }
        id
    }

    fn size(&self, id: u32) -> Option<u32> {
        let t = self.types.get(self.resolve(id) as usize)?;
        match t.kind {
            KIND_PTR => Some(8),
            KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION => Some(t.size_or_type),
            _ => None,
        }
    }
}

/// What the `cgroup_mkdir` watch reads, or why it cannot.
pub fn cgroup_offsets(btf: &Btf) -> Result<CgroupOffsets, String> {
    let get = |s: &str, m: &str, size: u32| match btf.member(s, m) {
        Some((off, sz)) if sz == size => Ok(off),
        Some((_, sz)) => Err(format!("struct {s}.{m} is {sz} bytes, expected {size}")),
        None => Err(format!("no struct {s}.{m} in the kernel's BTF")),
    };
    Ok(CgroupOffsets {
        enabled: 1,
        cgroup_kn: get("cgroup", "kn", 8)?,
        cgroup_root: get("cgroup", "root", 8)?,
        kn_id: get("kernfs_node", "id", 8)?,
        root_hierarchy_id: get("cgroup_root", "hierarchy_id", 4)?,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `int` (id 1), `long` (2, via typedef 3), `void *` (4), and
    /// `struct s { int a; union { void *p; long q; }; int b:3; }` (5, with the
    /// anonymous union as 6).
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0long\0s\0a\0p\0q\0b\0long_t\0";
        let off = |s: &str| {
            let needle = [b"\0", s.as_bytes(), b"\0"].concat();
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_slice())
                .map(|p| p as u32 + 1)
                .unwrap()
        };
        let mut t: Vec<u32> = Vec::new();
        t.extend([off("int"), KIND_INT << 24, 4, 32]);
        t.extend([off("long"), KIND_INT << 24, 8, 64]);
        t.extend([off("long_t"), KIND_TYPEDEF << 24, 2]);
        t.extend([0, KIND_PTR << 24, 0]);
        t.extend([off("s"), KIND_STRUCT << 24 | 1 << 31 | 3, 24]);
        t.extend([off("a"), 1, 0]);
        t.extend([0, 6, 64]);
        t.extend([off("b"), 1, 3 << 24 | 128]);
        t.extend([0, KIND_UNION << 24 | 2, 8]);
        t.extend([off("p"), 4, 0]);
        t.extend([off("q"), 3, 0]);
        let types: Vec<u8> = t.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(w.to_le_bytes());
        }
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.member("s", "a"), Some((0, 4)));
        assert_eq!(btf.member("s", "p"), Some((8, 8)));
        assert_eq!(btf.member("s", "q"), Some((8, 8)));
        assert_eq!(btf.member("s", "b"), None, "bitfields are not readable");
        assert_eq!(btf.member("s", "z"), None);
        assert_eq!(btf.member("t", "a"), None);
        assert!(cgroup_offsets(&btf).is_err());
    }

    #[test]
    fn running_kernel_has_what_the_watch_reads() {
        // Only where the kernel exposes its BTF.
        let Ok(btf) = Btf::from_sys_fs() else { return };
        let o = cgroup_offsets(&btf).unwrap();
        assert_eq!(o.enabled, 1);
        assert_ne!(o.cgroup_kn, o.cgroup_root);
    }
}
