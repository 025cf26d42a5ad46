//! `netcheck`: drives its virtio NIC (at the second virtio-mmio window) with `pv-drivers`' net
//! driver, in one of four roles on the hypervisor's virtual switch:
//!
//! - `role=ping peer=MAC count=N`: sends N requests to `peer` (even sequence numbers
//!   unicast, odd ones broadcast, of many sizes), each answered before the next is sent
//!   (resent after `wait=POLLS` polls without the answer, at most `tries=T` times).
//! - `role=pong peer=MAC count=N`: answers every request from `peer`, until it has answered N
//!   different ones.
//! - `role=listen polls=P [expect=N]`: counts the frames that arrive during P polls and
//!   reports them; fails if `expect` is given and the count differs.
//! - `role=spoof forge=MAC peer=MAC count=N [hop=VLAN] [polls=P]`: waits (at most P polls)
//!   until it hears a frame from ping (flooded to it while ping's peer is not learned yet, or
//!   broadcast), so that ping and pong are up; then sends N frames whose source is the forged
//!   MAC (half to `peer`, half broadcast), and N frames tagged for VLAN `hop` (its own
//!   source, broadcast). The switch must drop them all.
//! - `role=tap peer=MAC vlan=V want=N [hop=VLAN count=K] [polls=P]`: a guest on a trunk port:
//!   waits (at most P polls) for N of ping's frames, each of which must arrive tagged with
//!   VLAN V (checked after the tag is taken off), any other frame failing it; then sends K
//!   broadcast frames tagged for VLAN `hop` (which the switch delivers to that VLAN's access
//!   ports untagged) and K untagged ones (which a trunk without a native VLAN refuses).
//! - `role=echo ip=A.B.C.D gw=A.B.C.D count=N`: a host beyond dom0's uplink (the machine's
//!   NIC): asks for `gw`'s MAC by ARP (broadcast), then sends it N ICMP echo requests (of
//!   many sizes, each answered before the next, resent after `wait` polls at most `tries`
//!   times) and checks every reply (addresses, identifier, sequence, payload, checksums). It
//!   answers ARP requests for its own `ip` meanwhile.
//! - `role=blast peer=MAC count=N [size=B] [window=W]` and `role=sink peer=MAC count=N`, the
//!   benchmark pair: blast sends N frames of B bytes (default 1514) to sink in bursts of W
//!   (default 32), each burst acknowledged by sink before the next; both print the TSC ticks
//!   from the first frame to the last acknowledgement (`cargo xtask bench net`).
//!
//! Every frame carries the sender's role, its kind, a sequence number, a body derived from
//! them and a checksum; ping and pong check each other's, and any other frame arriving
//! (a forged one, one from another VLAN) counts as unexpected and fails them. Waits are
//! bounded poll counts, each poll giving up the CPU (YIELD) when nothing came; results are
//! printed as `netcheck: ROLE: ...` lines, exit code 0 on success, 1 on failure.
#![cfg_attr(target_os = "none", no_std, no_main)]
// Frame fields are narrow by definition.
#![allow(clippy::cast_possible_truncation)]

extern crate alloc;

use alloc::vec::Vec;
use core::ptr::NonNull;

use pv_drivers::devices::Net;
use pv_drivers::hal::IdentityHal;
use pv_drivers::transport::{MmioBus, RegisterTransport};
use test_guests::println;

test_guests::guest_main!(run);

test_guests::guest_heap!(1 << 20);

/// Receive (and transmit) buffers the driver keeps posted.
const QUEUE: usize = 16;
/// Each receive buffer: a 12-byte header and the largest frame, rounded up.
const RX_BUF: usize = 2048;
/// The EtherType of our frames (IEEE 802 local experimental 1).
const ETHERTYPE: u16 = 0x88b5;
const MAGIC: &[u8; 4] = b"HVNT";
/// Header: addresses, EtherType, magic, role, kind, sequence, body length.
const HEAD: usize = 26;
/// Longest body: the frame stays within 1514 bytes.
const MAX_BODY: usize = 1514 - HEAD - 4;

const BROADCAST: [u8; 6] = [0xff; 6];

/// Who sent a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Role {
    Ping = 1,
    Pong = 2,
    Spoof = 3,
    Echo = 4,
    Blast = 5,
    Sink = 6,
}

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Request = 1,
    Reply = 2,
    Forged = 3,
    Hop = 4,
}

type Nic = Net<IdentityHal, RegisterTransport<MmioBus>, QUEUE>;

fn body_len(role: Role, seq: u32) -> usize {
    1 + (seq as usize * 211 + role as usize * 17) % MAX_BODY
}

fn body_byte(role: Role, seq: u32, i: usize) -> u8 {
    let x = (u64::from(seq) << 20 | i as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((role as u64).wrapping_mul(0x632b_e59b_d9b4_e019));
    (x >> 56) as u8
}

/// FNV-1a, 32 bits.
fn checksum(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A frame from `src` to `dst`, tagged for `vlan` when given.
fn frame(
    dst: [u8; 6],
    src: [u8; 6],
    vlan: Option<u16>,
    role: Role,
    kind: Kind,
    seq: u32,
) -> Vec<u8> {
    let n = body_len(role, seq);
    let mut f = Vec::with_capacity(HEAD + 4 + n + 4);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(v) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&v.to_be_bytes());
    }
    let start = f.len() + 2;
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(MAGIC);
    f.push(role as u8);
    f.push(kind as u8);
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&(n as u16).to_le_bytes());
    f.extend((0..n).map(|i| body_byte(role, seq, i)));
    let sum = checksum(&f[start..]);
    f.extend_from_slice(&sum.to_le_bytes());
    f
}

/// A frame checked from end to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Msg {
    src: [u8; 6],
    dst: [u8; 6],
    role: u8,
    kind: u8,
    seq: u32,
}

/// Checks a received frame: our EtherType (untagged), magic, lengths, body and checksum.
fn parse(f: &[u8]) -> Result<Msg, &'static str> {
    if f.len() < HEAD + 4 {
        return Err("too short");
    }
    if u16::from_be_bytes([f[12], f[13]]) != ETHERTYPE || &f[14..18] != MAGIC {
        return Err("not a netcheck frame");
    }
    let n = usize::from(u16::from_le_bytes([f[24], f[25]]));
    if f.len() != HEAD + n + 4 {
        return Err("length differs from the header's");
    }
    let sum = u32::from_le_bytes([
        f[HEAD + n],
        f[HEAD + n + 1],
        f[HEAD + n + 2],
        f[HEAD + n + 3],
    ]);
    if checksum(&f[14..HEAD + n]) != sum {
        return Err("bad checksum");
    }
    let role = match f[18] {
        1 => Role::Ping,
        2 => Role::Pong,
        3 => Role::Spoof,
        _ => return Err("unknown sender role"),
    };
    let seq = u32::from_le_bytes([f[20], f[21], f[22], f[23]]);
    if n != body_len(role, seq) || (0..n).any(|i| f[HEAD + i] != body_byte(role, seq, i)) {
        return Err("body differs from its pattern");
    }
    let mut src = [0; 6];
    let mut dst = [0; 6];
    dst.copy_from_slice(&f[0..6]);
    src.copy_from_slice(&f[6..12]);
    Ok(Msg {
        src,
        dst,
        role: f[18],
        kind: f[19],
        seq,
    })
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

struct Mac([u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

fn fail(role: &str, why: core::fmt::Arguments<'_>) -> ! {
    println!("netcheck: {role}: FAILED: {why}");
    test_guests::exit(1)
}

/// Gives the CPU to others while waiting.
fn yield_cpu() {
    test_guests::hypercall(test_guests::hv_abi::hypercall::YIELD, 0, 0, 0);
}

fn send(nic: &mut Nic, role: &str, bytes: &[u8]) {
    let mut tx = nic.new_tx_buffer(bytes.len());
    tx.packet_mut().copy_from_slice(bytes);
    if let Err(e) = nic.send(tx) {
        fail(role, format_args!("send: {e:?}"));
    }
}

/// The next frame, if one arrived (its buffer goes straight back to the device).
fn poll(nic: &mut Nic, role: &str) -> Option<Vec<u8>> {
    let rx = nic.receive().ok()?;
    let bytes = rx.packet().to_vec();
    if let Err(e) = nic.recycle_rx_buffer(rx) {
        fail(role, format_args!("recycle: {e:?}"));
    }
    Some(bytes)
}

/// Counts frames that are not what the role expects, printing the first few.
struct Unexpected {
    role: &'static str,
    count: u32,
}

impl Unexpected {
    fn note(&mut self, bytes: &[u8], why: &str) {
        self.count += 1;
        if self.count <= 4 {
            let src = bytes.get(6..12).map_or([0; 6], |s| {
                let mut m = [0; 6];
                m.copy_from_slice(s);
                m
            });
            println!(
                "netcheck: {}: unexpected frame of {} bytes from {}: {why}",
                self.role,
                bytes.len(),
                Mac(src)
            );
        }
    }
}

fn ping(nic: &mut Nic, me: [u8; 6], peer: [u8; 6], count: u32, wait: u32, tries: u32) {
    let role = "ping";
    let mut bad = Unexpected { role, count: 0 };
    let (mut resent, mut stale) = (0u32, 0u32);
    for seq in 0..count {
        let dst = if seq % 2 == 0 { peer } else { BROADCAST };
        let request = frame(dst, me, None, Role::Ping, Kind::Request, seq);
        let mut answered = false;
        for attempt in 0..tries {
            if attempt > 0 {
                resent += 1;
            }
            send(nic, role, &request);
            let mut polls = 0;
            while polls < wait && !answered {
                let Some(bytes) = poll(nic, role) else {
                    polls += 1;
                    yield_cpu();
                    continue;
                };
                match parse(&bytes) {
                    Ok(m) if m.role == Role::Pong as u8 && m.kind == Kind::Reply as u8 => {
                        if m.src != peer || m.dst != me {
                            bad.note(&bytes, "a reply with the wrong addresses");
                        } else if m.seq == seq {
                            answered = true;
                        } else if m.seq < seq {
                            stale += 1;
                        } else {
                            bad.note(&bytes, "a reply to a request not sent yet");
                        }
                    }
                    Ok(_) => bad.note(&bytes, "not a reply from pong"),
                    Err(why) => bad.note(&bytes, why),
                }
            }
            if answered {
                break;
            }
        }
        if !answered {
            fail(
                role,
                format_args!("request {seq} not answered after {tries} tries of {wait} polls"),
            );
        }
    }
    // Late duplicates of answers to resent requests, and anything else still arriving.
    for _ in 0..wait.min(2000) {
        match poll(nic, role) {
            Some(bytes) => match parse(&bytes) {
                Ok(m) if m.role == Role::Pong as u8 && m.kind == Kind::Reply as u8 => stale += 1,
                Ok(_) => bad.note(&bytes, "not a reply from pong"),
                Err(why) => bad.note(&bytes, why),
            },
            None => yield_cpu(),
        }
    }
    println!(
        "netcheck: ping: {count} requests answered, every reply's payload checked; {} unexpected frames, {resent} resent, {stale} stale replies",
        bad.count
    );
    if bad.count != 0 {
        fail(role, format_args!("{} unexpected frames", bad.count));
    }
    println!("netcheck: ping: done");
}

fn pong(nic: &mut Nic, me: [u8; 6], peer: [u8; 6], count: u32, patience: u32) {
    let role = "pong";
    let mut bad = Unexpected { role, count: 0 };
    let mut seen = alloc::vec![false; count as usize];
    let (mut distinct, mut replies, mut idle) = (0u32, 0u32, 0u32);
    while distinct < count {
        let Some(bytes) = poll(nic, role) else {
            idle += 1;
            if idle > patience {
                fail(
                    role,
                    format_args!(
                        "{distinct} of {count} requests came, then none for {patience} polls"
                    ),
                );
            }
            yield_cpu();
            continue;
        };
        idle = 0;
        match parse(&bytes) {
            Ok(m) if m.role == Role::Ping as u8 && m.kind == Kind::Request as u8 => {
                let to_me = m.dst == me || m.dst == BROADCAST;
                if m.src != peer || !to_me || m.seq >= count {
                    bad.note(&bytes, "a request with the wrong addresses or sequence");
                    continue;
                }
                send(
                    nic,
                    role,
                    &frame(peer, me, None, Role::Pong, Kind::Reply, m.seq),
                );
                replies += 1;
                if !core::mem::replace(&mut seen[m.seq as usize], true) {
                    distinct += 1;
                }
            }
            Ok(_) => bad.note(&bytes, "not a request from ping"),
            Err(why) => bad.note(&bytes, why),
        }
    }
    println!(
        "netcheck: pong: {count} requests answered ({replies} replies), every request's payload checked; {} unexpected frames",
        bad.count
    );
    if bad.count != 0 {
        fail(role, format_args!("{} unexpected frames", bad.count));
    }
    println!("netcheck: pong: done");
}

fn listen(nic: &mut Nic, polls: u32, expect: Option<u32>) {
    let role = "listen";
    let mut heard = Unexpected { role, count: 0 };
    for _ in 0..polls {
        match poll(nic, role) {
            Some(bytes) => heard.note(&bytes, "heard"),
            None => yield_cpu(),
        }
    }
    println!(
        "netcheck: listen: {} frames received in {polls} polls",
        heard.count
    );
    if let Some(n) = expect
        && n != heard.count
    {
        fail(role, format_args!("expected {n} frames"));
    }
}

fn spoof(
    nic: &mut Nic,
    me: [u8; 6],
    forge: [u8; 6],
    peer: [u8; 6],
    count: u32,
    hop: Option<u16>,
    polls: u32,
) {
    let role = "spoof";
    let mut heard = false;
    for _ in 0..polls {
        match poll(nic, role) {
            Some(bytes) => {
                if parse(&bytes).is_ok_and(|m| m.role == Role::Ping as u8) {
                    heard = true;
                    break;
                }
            }
            None => yield_cpu(),
        }
    }
    if !heard {
        fail(
            role,
            format_args!("heard nothing from ping in {polls} polls"),
        );
    }
    for seq in 0..count {
        let dst = if seq % 2 == 0 { peer } else { BROADCAST };
        send(
            nic,
            role,
            &frame(dst, forge, None, Role::Spoof, Kind::Forged, seq),
        );
    }
    if let Some(v) = hop {
        for seq in 0..count {
            send(
                nic,
                role,
                &frame(BROADCAST, me, Some(v), Role::Spoof, Kind::Hop, seq),
            );
        }
    }
    println!(
        "netcheck: spoof: done: {count} frames sent from forged MAC {}, {} tagged for VLAN {}",
        Mac(forge),
        if hop.is_some() { count } else { 0 },
        hop.unwrap_or(0)
    );
}

/// The Internet checksum (RFC 1071) of `bytes`.
fn inet_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn parse_ip(text: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = text.split('.');
    for b in &mut ip {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

const ETH_ARP: u16 = 0x0806;
const ETH_IP: u16 = 0x0800;
/// Our ICMP echo identifier ("HV").
const ECHO_ID: u16 = 0x4856;

/// An ARP packet (Ethernet, IPv4): `op` 1 request, 2 reply.
fn arp(
    op: u16,
    dst: [u8; 6],
    me: [u8; 6],
    ip: [u8; 4],
    target_mac: [u8; 6],
    target_ip: [u8; 4],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&me);
    f.extend_from_slice(&ETH_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&me);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&target_ip);
    f.resize(60, 0);
    f
}

/// The payload of echo request `seq`: 8..=1400 bytes of a pattern.
fn echo_payload(seq: u16) -> Vec<u8> {
    let n = 8 + (usize::from(seq) * 331) % 1393;
    (0..n)
        .map(|i| body_byte(Role::Echo, u32::from(seq), i))
        .collect()
}

/// An ICMP echo request from `me`/`ip` to `gw_mac`/`gw`.
fn echo_request(me: [u8; 6], ip: [u8; 4], gw_mac: [u8; 6], gw: [u8; 4], seq: u16) -> Vec<u8> {
    let payload = echo_payload(seq);
    let mut icmp = Vec::with_capacity(8 + payload.len());
    icmp.extend_from_slice(&[8, 0, 0, 0]);
    icmp.extend_from_slice(&ECHO_ID.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(&payload);
    let sum = inet_sum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut iph = [0u8; 20];
    iph[0] = 0x45;
    iph[2..4].copy_from_slice(&total.to_be_bytes());
    iph[4..6].copy_from_slice(&seq.to_be_bytes());
    iph[8] = 64;
    iph[9] = 1;
    iph[12..16].copy_from_slice(&ip);
    iph[16..20].copy_from_slice(&gw);
    let sum = inet_sum(&iph);
    iph[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::with_capacity(14 + total as usize);
    f.extend_from_slice(&gw_mac);
    f.extend_from_slice(&me);
    f.extend_from_slice(&ETH_IP.to_be_bytes());
    f.extend_from_slice(&iph);
    f.extend_from_slice(&icmp);
    f
}

/// What an arriving frame is, to the echo role.
enum Heard {
    /// An ARP reply: who has which address.
    ArpReply([u8; 6], [u8; 4]),
    /// An ARP request for our address, from (MAC, IP).
    ArpAsk([u8; 6], [u8; 4]),
    /// A checked echo reply to us, with its sequence number.
    EchoReply(u16),
    /// Another host's broadcast ARP request (other guests on the network ask too).
    OthersArp,
    /// Anything else, and why it is not one of the above.
    Other(&'static str),
}

fn hear(f: &[u8], me: [u8; 6], ip: [u8; 4], gw: [u8; 4]) -> Heard {
    if f.len() < 14 {
        return Heard::Other("too short");
    }
    let ty = u16::from_be_bytes([f[12], f[13]]);
    let mac = |b: &[u8]| -> [u8; 6] { b.try_into().unwrap_or([0; 6]) };
    let ip4 = |b: &[u8]| -> [u8; 4] { b.try_into().unwrap_or([0; 4]) };
    if ty == ETH_ARP && f.len() >= 42 && f[14..22] == [0, 1, 8, 0, 6, 4, 0, 2] {
        return Heard::ArpReply(mac(&f[22..28]), ip4(&f[28..32]));
    }
    if ty == ETH_ARP && f.len() >= 42 && f[14..22] == [0, 1, 8, 0, 6, 4, 0, 1] {
        if f[38..42] == ip {
            return Heard::ArpAsk(mac(&f[22..28]), ip4(&f[28..32]));
        }
        return Heard::OthersArp;
    }
    if ty != ETH_IP || f.len() < 14 + 20 + 8 {
        return Heard::Other("neither ARP nor IPv4");
    }
    if f[0..6] != me {
        return Heard::Other("IPv4 for another MAC");
    }
    let iph = &f[14..34];
    let total = usize::from(u16::from_be_bytes([iph[2], iph[3]]));
    if iph[0] != 0x45 || inet_sum(iph) != 0 || total < 28 || 14 + total > f.len() {
        return Heard::Other("a bad IPv4 header");
    }
    if iph[9] != 1 || iph[12..16] != gw || iph[16..20] != ip {
        return Heard::Other("IPv4 that is not ICMP from the gateway to us");
    }
    let icmp = &f[34..14 + total];
    if inet_sum(icmp) != 0 {
        return Heard::Other("a bad ICMP checksum");
    }
    let id = u16::from_be_bytes([icmp[4], icmp[5]]);
    let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
    if icmp[0] != 0 || icmp[1] != 0 || id != ECHO_ID {
        return Heard::Other("ICMP that is not our echo reply");
    }
    if icmp[8..] != echo_payload(seq)[..] {
        return Heard::Other("an echo reply whose payload differs");
    }
    Heard::EchoReply(seq)
}

fn echo(nic: &mut Nic, me: [u8; 6], ip: [u8; 4], gw: [u8; 4], count: u32, wait: u32, tries: u32) {
    let role = "echo";
    let mut bad = Unexpected { role, count: 0 };
    let (mut resent, mut arp_answered, mut stale) = (0u32, 0u32, 0u32);
    let ipf = |a: [u8; 4]| {
        let [a, b, c, d] = a;
        alloc::format!("{a}.{b}.{c}.{d}")
    };
    // The gateway's MAC, by ARP.
    let mut gw_mac = None;
    'ask: for attempt in 0..tries * 4 {
        if attempt > 0 {
            resent += 1;
        }
        send(nic, role, &arp(1, BROADCAST, me, ip, [0; 6], gw));
        for _ in 0..wait {
            let Some(bytes) = poll(nic, role) else {
                yield_cpu();
                continue;
            };
            match hear(&bytes, me, ip, gw) {
                Heard::ArpReply(m, who) if who == gw => {
                    gw_mac = Some(m);
                    break 'ask;
                }
                Heard::ArpAsk(m, who) => {
                    send(nic, role, &arp(2, m, me, ip, m, who));
                    arp_answered += 1;
                }
                // Before the uplink is up, frames of the boot (other guests' broadcasts) may
                // pass: only frames that claim to be for us count against us.
                Heard::ArpReply(..) | Heard::OthersArp | Heard::Other(_) => {}
                Heard::EchoReply(_) => bad.note(&bytes, "an echo reply before any request"),
            }
        }
    }
    let Some(gw_mac) = gw_mac else {
        fail(
            role,
            format_args!("no ARP reply from {} after {} tries", ipf(gw), tries * 4),
        );
    };
    println!("netcheck: echo: {} is at {}", ipf(gw), Mac(gw_mac));
    for seq in 0..count as u16 {
        let request = echo_request(me, ip, gw_mac, gw, seq);
        let mut answered = false;
        for attempt in 0..tries {
            if attempt > 0 {
                resent += 1;
            }
            send(nic, role, &request);
            let mut polls = 0;
            while polls < wait && !answered {
                let Some(bytes) = poll(nic, role) else {
                    polls += 1;
                    yield_cpu();
                    continue;
                };
                match hear(&bytes, me, ip, gw) {
                    Heard::EchoReply(s) if s == seq => answered = true,
                    Heard::EchoReply(s) if s < seq => stale += 1,
                    Heard::EchoReply(_) => bad.note(&bytes, "a reply to a request not sent yet"),
                    Heard::ArpAsk(m, who) => {
                        send(nic, role, &arp(2, m, me, ip, m, who));
                        arp_answered += 1;
                    }
                    Heard::ArpReply(..) | Heard::OthersArp => {}
                    Heard::Other(why) => bad.note(&bytes, why),
                }
            }
            if answered {
                break;
            }
        }
        if !answered {
            fail(
                role,
                format_args!("echo {seq} not answered after {tries} tries of {wait} polls"),
            );
        }
    }
    println!(
        "netcheck: echo: {count} echo replies from {}, every payload checked; {} unexpected frames, {resent} resent, {stale} stale, {arp_answered} ARP requests answered",
        ipf(gw),
        bad.count
    );
    if bad.count != 0 {
        fail(role, format_args!("{} unexpected frames", bad.count));
    }
    println!("netcheck: echo: done");
}

/// A benchmark frame: our EtherType and magic, the sender's role, a sequence number, padding
/// to `size` bytes.
fn bench_frame(dst: [u8; 6], src: [u8; 6], role: Role, seq: u32, size: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(size.max(64));
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(MAGIC);
    f.push(role as u8);
    f.push(0);
    f.extend_from_slice(&seq.to_le_bytes());
    f.resize(size.max(64), 0x5a);
    f
}

/// The role and sequence number of a benchmark frame from `peer`.
fn bench_parse(f: &[u8], peer: [u8; 6]) -> Option<(u8, u32)> {
    if f.len() < 24 || f[6..12] != peer || u16::from_be_bytes([f[12], f[13]]) != ETHERTYPE {
        return None;
    }
    if &f[14..18] != MAGIC {
        return None;
    }
    Some((f[18], u32::from_le_bytes([f[20], f[21], f[22], f[23]])))
}

fn blast(nic: &mut Nic, me: [u8; 6], peer: [u8; 6], count: u32, size: usize, window: u32) {
    let role = "blast";
    let (mut sent, mut start, mut waits) = (0u32, 0u64, 0u64);
    while sent < count {
        let burst = window.min(count - sent);
        for i in 0..burst {
            send(
                nic,
                role,
                &bench_frame(peer, me, Role::Blast, sent + i, size),
            );
        }
        if sent == 0 {
            start = test_guests::rdtsc();
        }
        sent += burst;
        // The acknowledgement of everything sent so far.
        let mut polls = 0u32;
        loop {
            match poll(nic, role) {
                Some(f) => {
                    if bench_parse(&f, peer)
                        .is_some_and(|(r, n)| r == Role::Sink as u8 && n >= sent)
                    {
                        break;
                    }
                }
                None => {
                    polls += 1;
                    waits += 1;
                    if polls > 2_000_000 {
                        fail(role, format_args!("no acknowledgement of {sent} frames"));
                    }
                    core::hint::spin_loop();
                }
            }
        }
    }
    let ticks = test_guests::rdtsc() - start;
    println!(
        "netcheck: blast: {count} frames of {size} bytes in {ticks} ticks (bursts of {window}, {waits} empty polls)"
    );
    println!("netcheck: blast: done");
}

fn sink(nic: &mut Nic, me: [u8; 6], peer: [u8; 6], count: u32, window: u32) {
    let role = "sink";
    let (mut got, mut bytes, mut start, mut lost) = (0u32, 0u64, 0u64, 0u32);
    while got < count {
        let Some(f) = poll(nic, role) else {
            core::hint::spin_loop();
            continue;
        };
        let Some((r, seq)) = bench_parse(&f, peer) else {
            continue;
        };
        if r != Role::Blast as u8 {
            continue;
        }
        if got == 0 {
            start = test_guests::rdtsc();
        }
        // Frames are numbered; a gap is a frame the switch dropped.
        lost += seq.saturating_sub(got);
        got = got.max(seq + 1);
        bytes += f.len() as u64;
        if got % window == 0 || got == count {
            send(nic, role, &bench_frame(peer, me, Role::Sink, got, 64));
        }
    }
    let ticks = test_guests::rdtsc() - start;
    println!("netcheck: sink: {got} frames, {bytes} bytes in {ticks} ticks, {lost} lost");
    println!("netcheck: sink: done");
}

#[allow(clippy::too_many_arguments)]
fn tap(
    nic: &mut Nic,
    me: [u8; 6],
    peer: [u8; 6],
    vlan: u16,
    want: u32,
    hop: Option<u16>,
    count: u32,
    polls: u32,
) {
    let role = "tap";
    let mut bad = Unexpected { role, count: 0 };
    let mut heard = 0u32;
    for _ in 0..polls {
        if heard >= want {
            break;
        }
        let Some(f) = poll(nic, role) else {
            yield_cpu();
            continue;
        };
        if f.len() < 18 || u16::from_be_bytes([f[12], f[13]]) != 0x8100 {
            bad.note(&f, "an untagged frame on a trunk without a native VLAN");
            continue;
        }
        let vid = u16::from_be_bytes([f[14], f[15]]) & 0xfff;
        let mut plain = f[..12].to_vec();
        plain.extend_from_slice(&f[16..]);
        match parse(&plain) {
            Ok(m) if vid == vlan && m.src == peer && m.role == Role::Ping as u8 => heard += 1,
            Ok(_) => bad.note(&f, "a frame of another VLAN or sender"),
            Err(why) => bad.note(&f, why),
        }
    }
    if heard < want {
        fail(
            role,
            format_args!("{heard} of {want} frames from ping in {polls} polls"),
        );
    }
    let sent = if hop.is_some() { count } else { 0 };
    if let Some(v) = hop {
        for seq in 0..count {
            send(
                nic,
                role,
                &frame(BROADCAST, me, Some(v), Role::Spoof, Kind::Hop, seq),
            );
            send(
                nic,
                role,
                &frame(BROADCAST, me, None, Role::Spoof, Kind::Hop, seq),
            );
        }
    }
    println!(
        "netcheck: tap: {heard} frames tagged VLAN {vlan} from {}, every payload checked; {} unexpected frames; sent {sent} tagged for VLAN {} and {sent} untagged",
        Mac(peer),
        bad.count,
        hop.unwrap_or(0),
    );
    if bad.count != 0 {
        fail(role, format_args!("{} unexpected frames", bad.count));
    }
    println!("netcheck: tap: done");
}

fn run(args: &str, _ram: u64) {
    heap::init();
    let arg = |k: &str| {
        args.split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
    };
    let num = |k: &str, default: u32| arg(k).and_then(|v| v.parse().ok()).unwrap_or(default);
    let role: &'static str = match arg("role") {
        Some("ping") => "ping",
        Some("pong") => "pong",
        Some("listen") => "listen",
        Some("spoof") => "spoof",
        Some("echo") => "echo",
        Some("blast") => "blast",
        Some("tap") => "tap",
        Some("sink") => "sink",
        other => {
            println!(
                "netcheck: FAILED: role={other:?}: must be ping, pong, listen, spoof, echo, blast, sink or tap"
            );
            test_guests::exit(1);
        }
    };
    let mac_arg = |k: &str| match arg(k).map(parse_mac) {
        Some(Some(m)) => m,
        _ => fail(
            role,
            format_args!("{k}=MAC missing or not xx:xx:xx:xx:xx:xx"),
        ),
    };
    // `window=W`: the NIC at that virtio window (a guest's NIC k is at window 2k + 1).
    let window = u64::from(num("window", 1));
    let base = hv_abi::devices::VIRTIO_MMIO_BASE + window * hv_abi::devices::VIRTIO_MMIO_STRIDE;
    // SAFETY: the hypervisor puts this domain's NIC at the second virtio-mmio window; the page
    // is identity-mapped by the loader (the first 4 GiB), and nothing else in this guest
    // touches it.
    let bus = unsafe { MmioBus::new(NonNull::new(base as *mut u8).expect("not null"), 0x200) };
    let transport = match RegisterTransport::new(bus) {
        Ok(t) => t,
        Err(e) => fail(role, format_args!("no virtio device at {base:#x}: {e:?}")),
    };
    let mut nic: Nic = match Net::new(transport, RX_BUF) {
        Ok(n) => n,
        Err(e) => fail(role, format_args!("the NIC did not initialise: {e:?}")),
    };
    let me = nic.mac_address();
    println!("netcheck: {role}: NIC up, MAC {}", Mac(me));
    let count = num("count", 20);
    match role {
        "ping" => ping(
            &mut nic,
            me,
            mac_arg("peer"),
            count,
            num("wait", 20_000),
            num("tries", 5),
        ),
        "pong" => pong(&mut nic, me, mac_arg("peer"), count, num("polls", 200_000)),
        "blast" => blast(
            &mut nic,
            me,
            mac_arg("peer"),
            count,
            (num("size", 1514) as usize).clamp(64, 1514),
            num("window", 32).max(1),
        ),
        "tap" => tap(
            &mut nic,
            me,
            mac_arg("peer"),
            num("vlan", 1) as u16,
            num("want", 1),
            arg("hop").and_then(|v| v.parse().ok()),
            count,
            num("polls", 200_000),
        ),
        "sink" => sink(
            &mut nic,
            me,
            mac_arg("peer"),
            count,
            num("window", 32).max(1),
        ),
        "echo" => {
            let ip_arg = |k: &str| match arg(k).map(parse_ip) {
                Some(Some(a)) => a,
                _ => fail(
                    role,
                    format_args!("{k}=A.B.C.D missing or not an IPv4 address"),
                ),
            };
            echo(
                &mut nic,
                me,
                ip_arg("ip"),
                ip_arg("gw"),
                count,
                num("wait", 20_000),
                num("tries", 5),
            );
        }
        "listen" => listen(
            &mut nic,
            num("polls", 20_000),
            arg("expect").and_then(|v| v.parse().ok()),
        ),
        _ => spoof(
            &mut nic,
            me,
            mac_arg("forge"),
            mac_arg("peer"),
            count,
            arg("hop").and_then(|v| v.parse().ok()),
            num("polls", 200_000),
        ),
    }
}
