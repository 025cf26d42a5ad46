//! A domain's settings, from its boot module's command line:
//! `name=NAME mem=MIB cpu=N vcpus=N weight=W cap=C reserve=R pin=CPUS role=dom0 disk=pool/VOLUME[,ro]
//! nic=NETWORK[,vlan=N][,mac=MAC] -- GUEST COMMAND LINE`
//! (everything after ` -- ` is the guest's own command line). `cpu=N` puts vCPU i on CPU N+i
//! for good; without it the scheduler places and moves them, within `pin=CPUS` when given.
//! The scheduling keys (`sched::keys`) say how much CPU it gets.
//! Values are checked here; a bad line names what is wrong.

use alloc::string::String;
use alloc::vec::Vec;

use hv_vswitch::{MacAddr, VlanId, VlanSet};

use crate::cmdline::CommandLine;
use crate::sched::keys::{Change, KEYS};

/// Default RAM of a domain, MiB.
pub const DEFAULT_MEM_MIB: u64 = 16;
/// Largest RAM a boot module may ask for, MiB.
pub const MAX_MEM_MIB: u64 = 4096;
/// Most vCPUs of one domain.
pub const MAX_VCPUS: u32 = 16;

/// Settings of a domain, from its boot module's command line:
/// `name=NAME mem=MIB cpu=N -- GUEST COMMAND LINE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainConfig<'a> {
    pub name: &'a str,
    pub mem_mib: u64,
    pub vcpus: u32,
    /// vCPU 0 stays on this CPU, the next vCPUs on the CPUs after it; None: the scheduler
    /// places and moves them.
    pub cpu: Option<usize>,
    /// Weight, cap, reservation and pinning; what is not given keeps the defaults.
    pub sched: Change,
    /// `role=dom0`: the privileged domain (domain 0), which serves the guests' disks.
    pub dom0: bool,
    /// Each `disk=pool/VOLUME[,ro]`, in order: virtio disks served by dom0 from those
    /// volumes (at most [`hv_abi::devices::MAX_PER_KIND`]).
    pub disks: Vec<DiskSpec<'a>>,
    /// Each `nic=NETWORK[,vlan=N][,trunk=..][,mac=MAC]`, in order: virtio NICs on those
    /// networks' switches (at most [`hv_abi::devices::MAX_PER_KIND`]).
    pub nics: Vec<NicSpec<'a>>,
    pub guest_cmdline: &'a str,
}

/// A guest's disk: a volume of dom0's pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpec<'a> {
    pub volume: &'a str,
    pub read_only: bool,
}

impl<'a> DiskSpec<'a> {
    fn parse(text: &'a str) -> Result<DiskSpec<'a>, String> {
        let (volume, read_only) = match text.split_once(',') {
            None => (text, false),
            Some((v, "ro")) => (v, true),
            Some((_, opt)) => {
                return Err(alloc::format!(
                    "disk={text}: unknown option '{opt}' (disk=pool/VOLUME or disk=pool/VOLUME,ro)"
                ));
            }
        };
        if !super::hypercall::valid_volume_name(volume) {
            return Err(alloc::format!(
                "disk={text}: not a volume name (pool/VOLUME, letters, digits, '.', '_', '-')"
            ));
        }
        Ok(DiskSpec { volume, read_only })
    }
}

/// Longest network name.
pub const NETWORK_NAME_MAX: usize = 32;

/// A guest's NIC: an access port of network `network`'s switch on `vlan`, or a trunk port
/// carrying the VLANs `trunk` lists (802.1Q-tagged; untagged frames on `vlan` when it was
/// given, refused otherwise), bound to `mac`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NicSpec<'a> {
    /// `[a-z0-9_-]+`, at most [`NETWORK_NAME_MAX`] bytes.
    pub network: &'a str,
    /// The access VLAN (default 1), or a trunk's native VLAN when `native`.
    pub vlan: VlanId,
    /// A trunk's VLANs, `N+N+...` as written (checked by [`trunk_vlans`]); `None`: an access
    /// port.
    pub trunk: Option<&'a str>,
    /// A trunk's untagged frames go to `vlan` (`vlan=` was given with `trunk=`).
    pub native: bool,
    /// A station (unicast, non-zero) address; `None`: [`default_mac`] of the domain's id.
    pub mac: Option<MacAddr>,
}

/// The VLANs of `trunk=N+N+...`: each 1..=4094, at least one, none twice.
pub fn trunk_vlans(list: &str) -> Result<VlanSet, String> {
    let mut set = VlanSet::empty();
    for v in list.split('+') {
        let id = v
            .parse()
            .ok()
            .and_then(VlanId::new)
            .ok_or_else(|| alloc::format!("'{v}' is not a VLAN id, 1..4094"))?;
        if !set.insert(id) {
            return Err(alloc::format!("VLAN {v} listed twice"));
        }
    }
    Ok(set)
}

/// Whether `name` is a network name: 1..=[`NETWORK_NAME_MAX`] of `[a-z0-9_-]`.
pub fn valid_network_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NETWORK_NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

/// The MAC of a NIC given none: locally administered, unicast, the domain id in the last
/// four bytes (`02:00:00:00:00:01` for domain 1), so no two domains share one.
pub fn default_mac(domain_id: u32) -> MacAddr {
    let [a, b, c, d] = domain_id.to_be_bytes();
    MacAddr([0x02, 0x00, a, b, c, d])
}

/// `xx:xx:xx:xx:xx:xx` (hex digits, either case).
fn parse_mac(text: &str) -> Option<MacAddr> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(MacAddr(mac))
}

impl<'a> NicSpec<'a> {
    fn parse(text: &'a str) -> Result<NicSpec<'a>, String> {
        let mut words = text.split(',');
        let network = words.next().unwrap_or("");
        if !valid_network_name(network) {
            return Err(alloc::format!(
                "nic={text}: '{network}' is not a network name (1..{NETWORK_NAME_MAX} of a-z, 0-9, '_', '-')"
            ));
        }
        let (mut vlan, mut mac, mut trunk) = (None, None, None);
        for w in words {
            match w.split_once('=') {
                Some(("vlan", v)) if vlan.is_none() => {
                    vlan = Some(v.parse().ok().and_then(VlanId::new).ok_or_else(|| {
                        alloc::format!("nic={text}: vlan={v}: must be a VLAN id, 1..4094")
                    })?);
                }
                Some(("mac", m)) if mac.is_none() => {
                    let a = parse_mac(m).ok_or_else(|| {
                        alloc::format!("nic={text}: mac={m}: not a MAC address (xx:xx:xx:xx:xx:xx)")
                    })?;
                    if !a.is_station() {
                        return Err(alloc::format!(
                            "nic={text}: mac={m}: a multicast or all-zero address; a NIC needs a unicast one"
                        ));
                    }
                    mac = Some(a);
                }
                Some(("trunk", t)) if trunk.is_none() => {
                    trunk_vlans(t).map_err(|e| alloc::format!("nic={text}: trunk={t}: {e}"))?;
                    trunk = Some(t);
                }
                Some(("vlan" | "mac" | "trunk", _)) => {
                    return Err(alloc::format!("nic={text}: '{w}': given twice"));
                }
                _ => {
                    return Err(alloc::format!(
                        "nic={text}: unknown option '{w}' (nic=NETWORK[,vlan=N][,trunk=N+N...][,mac=MAC])"
                    ));
                }
            }
        }
        if let (Some(t), Some(v)) = (trunk, vlan)
            && !trunk_vlans(t).is_ok_and(|set| set.contains(v))
        {
            return Err(alloc::format!(
                "nic={text}: vlan={v}: a trunk's native VLAN must be one it carries (trunk={t})"
            ));
        }
        Ok(NicSpec {
            network,
            vlan: vlan.unwrap_or(VlanId::MIN),
            trunk,
            native: trunk.is_some() && vlan.is_some(),
            mac,
        })
    }
}

impl<'a> DomainConfig<'a> {
    pub fn parse(text: &'a str) -> Result<DomainConfig<'a>, String> {
        // The first word that is exactly `--` ends our options, wherever it stands.
        let split = text
            .split_ascii_whitespace()
            .find(|w| *w == "--")
            .map(|w| w.as_ptr() as usize - text.as_ptr() as usize);
        let (ours, guest) = match split {
            Some(at) => (&text[..at], text[at + 2..].trim_start()),
            None => (text, ""),
        };
        let c = CommandLine::new(ours);
        let mem_mib = match c.get("mem") {
            None => DEFAULT_MEM_MIB,
            Some(m) => m
                .parse()
                .map_err(|_| alloc::format!("mem={m}: not a number of MiB"))?,
        };
        if !(2..=MAX_MEM_MIB).contains(&mem_mib) || mem_mib % 2 != 0 {
            return Err(alloc::format!(
                "mem={mem_mib}: must be an even number of MiB, 2..{MAX_MEM_MIB}"
            ));
        }
        let cpu = match c.get("cpu") {
            None => None,
            Some(n) => Some(
                n.parse()
                    .map_err(|_| alloc::format!("cpu={n}: not a CPU number"))?,
            ),
        };
        let vcpus = match c.get("vcpus") {
            None => 1,
            Some(n) => n
                .parse()
                .map_err(|_| alloc::format!("vcpus={n}: not a number"))?,
        };
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(alloc::format!("vcpus={vcpus}: must be 1..{MAX_VCPUS}"));
        }
        let mut sched = Change::default();
        for key in KEYS {
            if let Some(value) = c.get(key) {
                sched
                    .set(key, value)
                    .map_err(|e| alloc::format!("{key}={value}: {e}"))?;
            }
        }
        if cpu.is_some() && sched.pin.is_some() {
            return Err(String::from(
                "cpu= and pin= both given: cpu=N keeps each vCPU on one CPU, pin=CPUS lets the scheduler move them within a set; choose one",
            ));
        }
        let dom0 = match c.get("role") {
            None | Some("guest") => false,
            Some("dom0") => true,
            Some("initrd") => {
                return Err(String::from(
                    "role=initrd: this module is an initrd (for=NAME names its domain), not a domain",
                ));
            }
            Some(r) => return Err(alloc::format!("role={r}: must be dom0, guest or initrd")),
        };
        let disks: Vec<DiskSpec<'a>> = c
            .options()
            .filter(|(k, _)| *k == "disk")
            .map(|(_, v)| DiskSpec::parse(v))
            .collect::<Result<_, _>>()?;
        let nics: Vec<NicSpec<'a>> = c
            .options()
            .filter(|(k, _)| *k == "nic")
            .map(|(_, v)| NicSpec::parse(v))
            .collect::<Result<_, _>>()?;
        let most = hv_abi::devices::MAX_PER_KIND;
        if disks.len() > most || nics.len() > most {
            return Err(alloc::format!(
                "{} disk= and {} nic=: at most {most} of each",
                disks.len(),
                nics.len()
            ));
        }
        if dom0 && !disks.is_empty() {
            return Err(String::from(
                "role=dom0 with disk=: dom0 owns the physical disks; it has no virtual disk",
            ));
        }
        if dom0 && !nics.is_empty() {
            return Err(String::from(
                "role=dom0 with nic=: dom0 owns the physical NICs; it has no virtual NIC (yet)",
            ));
        }
        Ok(DomainConfig {
            dom0,
            disks,
            nics,
            name: c.get("name").unwrap_or("guest"),
            mem_mib,
            vcpus,
            cpu,
            sched,
            guest_cmdline: guest,
        })
    }
}

/// The domain a boot module is the initrd of: `role=initrd for=NAME` gives `Some(NAME)`;
/// any other module `None`. An initrd module without `for=` is an error.
pub fn initrd_for(text: &str) -> Result<Option<&str>, String> {
    let ours = match text.split_ascii_whitespace().find(|w| *w == "--") {
        Some(w) => &text[..w.as_ptr() as usize - text.as_ptr() as usize],
        None => text,
    };
    let c = CommandLine::new(ours);
    if c.get("role") != Some("initrd") {
        return Ok(None);
    }
    match c.get("for") {
        Some(name) if !name.is_empty() => Ok(Some(name)),
        _ => Err(String::from(
            "role=initrd without for=NAME: say which domain's kernel this initrd is for",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_values() {
        let c = DomainConfig::parse("").unwrap();
        assert_eq!(
            (c.name, c.mem_mib, c.vcpus, c.cpu, c.guest_cmdline),
            ("guest", 16, 1, None, "")
        );
        let c =
            DomainConfig::parse("name=web mem=64 cpu=1 vcpus=4 -- root=/dev/vda quiet").unwrap();
        assert_eq!((c.name, c.mem_mib, c.vcpus, c.cpu), ("web", 64, 4, Some(1)));
        assert_eq!(c.guest_cmdline, "root=/dev/vda quiet");
        assert_eq!(DomainConfig::parse("name=x --").unwrap().guest_cmdline, "");
        let c = DomainConfig::parse("weight=512 cap=25 reserve=10 pin=0-1").unwrap();
        assert_eq!(
            (c.sched.weight, c.sched.cap, c.sched.reserve, c.sched.pin),
            (Some(512), Some(Some(25)), Some(10), Some(0b11))
        );
        assert!(DomainConfig::parse("").unwrap().sched.is_empty());
        // Options after `--` belong to the guest.
        assert_eq!(DomainConfig::parse("-- mem=9").unwrap().mem_mib, 16);
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        let e = |t| DomainConfig::parse(t).unwrap_err();
        assert_eq!(e("mem=lots"), "mem=lots: not a number of MiB");
        assert!(e("mem=3").contains("even number of MiB"));
        assert!(e("mem=0").contains("even number of MiB"));
        assert!(e("mem=8192").contains("2..4096"));
        assert_eq!(e("cpu=two"), "cpu=two: not a CPU number");
        assert!(e("vcpus=0").contains("1..16"));
        assert!(e("vcpus=17").contains("1..16"));
        assert_eq!(e("vcpus=x"), "vcpus=x: not a number");
        assert_eq!(e("weight=0"), "weight=0: weight: must be 1..65535");
        assert!(e("pin=9-2").starts_with("pin=9-2: pin: not a CPU list"));
        assert!(e("cpu=1 pin=0-1").contains("choose one"));
        assert_eq!(e("role=king"), "role=king: must be dom0, guest or initrd");
        assert!(e("role=initrd for=lx").contains("is an initrd"));
        assert_eq!(initrd_for("role=initrd for=lx"), Ok(Some("lx")));
        assert_eq!(initrd_for("name=lx mem=256 -- role=initrd"), Ok(None));
        assert!(initrd_for("role=initrd").unwrap_err().contains("for=NAME"));
        assert!(e("disk=data").contains("not a volume name"));
        assert!(e("disk=pool/data,rw").contains("unknown option 'rw'"));
        assert!(e("role=dom0 disk=p/v").contains("owns the physical disks"));
        assert!(e("role=dom0 nic=lan").contains("owns the physical NICs"));
    }

    #[test]
    fn nics() {
        assert!(DomainConfig::parse("").unwrap().nics.is_empty());
        let c = DomainConfig::parse("name=web nic=lan").unwrap();
        assert_eq!(
            c.nics.first().copied(),
            Some(NicSpec {
                network: "lan",
                vlan: VlanId::MIN,
                trunk: None,
                native: false,
                mac: None
            })
        );
        let n = DomainConfig::parse("nic=dmz-2_b,vlan=4094,mac=02:AB:00:00:0a:ff")
            .unwrap()
            .nics[0];
        assert_eq!(
            (n.network, n.vlan.get(), n.mac),
            ("dmz-2_b", 4094, Some(MacAddr([2, 0xab, 0, 0, 0x0a, 0xff])))
        );
        let n = DomainConfig::parse("nic=lan,mac=52:54:00:12:34:56,vlan=10")
            .unwrap()
            .nics[0];
        assert_eq!(n.vlan.get(), 10);
        // Trunks: tagged VLANs, and a native one only when vlan= is given.
        let n = DomainConfig::parse("nic=lan,trunk=10+20").unwrap().nics[0];
        assert_eq!((n.trunk, n.native), (Some("10+20"), false));
        let set = trunk_vlans(n.trunk.unwrap()).unwrap();
        assert_eq!(set.iter().map(VlanId::get).collect::<Vec<_>>(), [10, 20]);
        let n = DomainConfig::parse("nic=lan,vlan=20,trunk=10+20")
            .unwrap()
            .nics[0];
        assert_eq!((n.vlan.get(), n.native), (20, true));
        assert_eq!(default_mac(1), MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(default_mac(0x0102_0304), MacAddr([2, 0, 1, 2, 3, 4]));
        assert!(default_mac(7).is_station());
    }

    #[test]
    fn bad_nics_say_what_is_wrong() {
        let e = |t| DomainConfig::parse(t).unwrap_err();
        assert!(e("nic=").contains("'' is not a network name"));
        assert!(e("nic=LAN").contains("'LAN' is not a network name"));
        assert!(e("nic=a.b").contains("not a network name"));
        let long = alloc::format!("nic={}", "n".repeat(33));
        assert!(
            DomainConfig::parse(&long)
                .unwrap_err()
                .contains("not a network name")
        );
        assert!(DomainConfig::parse(&long[..long.len() - 1]).is_ok());
        assert_eq!(
            e("nic=lan,vlan=0"),
            "nic=lan,vlan=0: vlan=0: must be a VLAN id, 1..4094"
        );
        assert!(e("nic=lan,vlan=4095").contains("vlan=4095: must be a VLAN id"));
        assert!(e("nic=lan,vlan=ten").contains("vlan=ten: must be a VLAN id"));
        assert!(e("nic=lan,vlan=").contains("vlan=: must be a VLAN id"));
        assert!(e("nic=lan,mac=02:00:00:00:00").contains("mac=02:00:00:00:00: not a MAC address"));
        assert!(e("nic=lan,mac=02:00:00:00:00:01:02").contains("not a MAC address"));
        assert!(e("nic=lan,mac=02:00:00:00:00:1").contains("not a MAC address"));
        assert!(e("nic=lan,mac=02:00:00:00:00:+1").contains("not a MAC address"));
        assert!(e("nic=lan,mac=0g:00:00:00:00:01").contains("not a MAC address"));
        assert!(e("nic=lan,mac=01:00:5e:00:00:01").contains("needs a unicast one"));
        assert!(e("nic=lan,mac=ff:ff:ff:ff:ff:ff").contains("needs a unicast one"));
        assert!(e("nic=lan,mac=00:00:00:00:00:00").contains("needs a unicast one"));
        assert!(e("nic=lan,vlan=2,vlan=3").contains("'vlan=3': given twice"));
        assert!(e("nic=lan,trunk=").contains("trunk=: '' is not a VLAN id"));
        assert!(e("nic=lan,trunk=10+0").contains("'0' is not a VLAN id"));
        assert!(e("nic=lan,trunk=10+4095").contains("'4095' is not a VLAN id"));
        assert!(e("nic=lan,trunk=10+10").contains("VLAN 10 listed twice"));
        assert!(e("nic=lan,trunk=10,trunk=20").contains("given twice"));
        assert!(e("nic=lan,vlan=30,trunk=10+20").contains("native VLAN must be one it carries"));
        assert_eq!(
            e("nic=lan,speed=10"),
            "nic=lan,speed=10: unknown option 'speed=10' (nic=NETWORK[,vlan=N][,trunk=N+N...][,mac=MAC])"
        );
        assert!(e("nic=lan,").contains("unknown option ''"));
    }

    #[test]
    fn roles_and_disks() {
        let c = DomainConfig::parse("role=dom0 name=dom0").unwrap();
        assert!(c.dom0 && c.disks.is_empty());
        let c = DomainConfig::parse("disk=pool0/web-1").unwrap();
        assert!(!c.dom0);
        assert_eq!(
            c.disks,
            [DiskSpec {
                volume: "pool0/web-1",
                read_only: false
            }]
        );
        let c = DomainConfig::parse("disk=pool0/base,ro").unwrap();
        assert!(c.disks[0].read_only);
    }

    #[test]
    fn several_disks_and_nics_keep_their_order() {
        let c = DomainConfig::parse("disk=p/a nic=lan disk=p/b,ro nic=dmz,vlan=3").unwrap();
        let vols: Vec<_> = c.disks.iter().map(|d| (d.volume, d.read_only)).collect();
        assert_eq!(vols, [("p/a", false), ("p/b", true)]);
        let nets: Vec<_> = c.nics.iter().map(|n| (n.network, n.vlan.get())).collect();
        assert_eq!(nets, [("lan", 1), ("dmz", 3)]);
        let e = DomainConfig::parse("disk=p/a disk=p/b disk=p/c disk=p/d disk=p/e").unwrap_err();
        assert!(e.contains("at most 4 of each"), "{e}");
        let e = DomainConfig::parse("disk=p/a disk=bad").unwrap_err();
        assert!(e.contains("disk=bad: not a volume name"), "{e}");
        // Windows: disk k at 2k, NIC k at 2k + 1.
        assert_eq!(
            (0..4).map(hv_abi::devices::disk_window).collect::<Vec<_>>(),
            [0, 2, 4, 6]
        );
        assert_eq!(
            (0..4).map(hv_abi::devices::nic_window).collect::<Vec<_>>(),
            [1, 3, 5, 7]
        );
    }
}
