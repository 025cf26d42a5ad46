//! The fake physical memory behind the driver's `Dma`: one byte array that both the driver's
//! buffers (through `FakeBuf`) and the model's DMA engine (by bus address) reach.
//!
//! dom0's addresses ("gpa") start at `GPA_BASE`; page `i` of them is backed by byte page
//! `perm(i)` of the array, whose bus address is `bus_base + perm(i) * 4096`. The layouts
//! choose `perm` and `bus_base`: contiguous but not 64 KiB-aligned, pages swapped in pairs
//! (nothing contiguous across a page), straddling 4 GiB, or untranslatable.

// Offsets into the fake memory are small by construction.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use dom0_drivers::dma::{Dma, DmaBuf};

pub const PAGE: u64 = 4096;
pub const GPA_BASE: u64 = 0x40_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Physically contiguous, not 64 KiB-aligned.
    Contiguous,
    /// Pages swapped in pairs: every page is its own PRD region.
    PairSwapped,
    /// Bus addresses from 4 GiB - 4 KiB: unusable for a 32-bit engine.
    High,
    /// `translate` always fails.
    Untranslatable,
}

impl Layout {
    fn bus_base(self) -> u64 {
        match self {
            // The driver's first buffer (after the 4 pages of "the rest of dom0") starts
            // 4 KiB below a 64 KiB boundary.
            Self::Contiguous | Self::PairSwapped | Self::Untranslatable => 0x8000_B000,
            Self::High => 0xFFFF_F000,
        }
    }

    fn perm(self, page: u64) -> u64 {
        match self {
            Self::PairSwapped => page ^ 1,
            _ => page,
        }
    }
}

/// The memory array and what the driver was given of it.
pub struct PhysMem {
    pub layout: Layout,
    pub bytes: Vec<u8>,
    /// Array pages handed out by `FakeDma::alloc`.
    pub owned: HashSet<u64>,
}

impl PhysMem {
    pub fn new(layout: Layout, pages: usize) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            layout,
            // Not zero: a transfer that misses a byte shows.
            bytes: vec![0xEE; pages * PAGE as usize],
            owned: HashSet::new(),
        }))
    }

    pub fn pages(&self) -> u64 {
        self.bytes.len() as u64 / PAGE
    }

    /// The array offset of bus address `bus`, which must lie in a page the driver owns: a
    /// DMA anywhere else is a bug of the driver.
    pub fn dma_offset(&self, bus: u64, len: u64) -> usize {
        let base = self.layout.bus_base();
        assert!(bus >= base, "DMA below the fake memory: {bus:#x}");
        let off = bus - base;
        assert!(
            off + len <= self.bytes.len() as u64,
            "DMA beyond the fake memory: {bus:#x}+{len:#x}"
        );
        let mut page = off / PAGE;
        while page * PAGE < off + len {
            assert!(
                self.owned.contains(&page),
                "DMA to memory the driver does not own: bus {:#x}",
                base + page * PAGE
            );
            page += 1;
        }
        off as usize
    }

    /// The array offset behind gpa `addr` (inside one page).
    fn gpa_offset(&self, addr: u64) -> Option<usize> {
        let page = addr.checked_sub(GPA_BASE)? / PAGE;
        if page >= self.pages() {
            return None;
        }
        Some((self.layout.perm(page) * PAGE + addr % PAGE) as usize)
    }
}

/// The driver's DMA allocator.
pub struct FakeDma {
    mem: Arc<Mutex<PhysMem>>,
    next: u64,
}

impl FakeDma {
    pub fn new(mem: Arc<Mutex<PhysMem>>) -> Self {
        // Leave the first pages to "the rest of dom0": the model checks no DMA lands there.
        Self {
            mem,
            next: GPA_BASE + 4 * PAGE,
        }
    }
}

pub struct FakeBuf {
    mem: Arc<Mutex<PhysMem>>,
    addr: u64,
    size: usize,
}

impl DmaBuf for FakeBuf {
    fn addr(&self) -> u64 {
        self.addr
    }

    fn size(&self) -> usize {
        self.size
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.size, "read past the buffer");
        let mem = self.mem.lock().unwrap();
        for (i, b) in out.iter_mut().enumerate() {
            let at = mem.gpa_offset(self.addr + (offset + i) as u64).unwrap();
            *b = mem.bytes[at];
        }
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.size, "write past the buffer");
        let mut mem = self.mem.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            let at = mem.gpa_offset(self.addr + (offset + i) as u64).unwrap();
            mem.bytes[at] = *b;
        }
    }
}

impl Dma for FakeDma {
    type Buf = FakeBuf;

    fn alloc(&mut self, bytes: usize, align: usize) -> Option<FakeBuf> {
        let align = align.max(1) as u64;
        let addr = self.next.div_ceil(align) * align;
        let size = (bytes as u64).div_ceil(PAGE) * PAGE;
        let mut mem = self.mem.lock().unwrap();
        if addr + size > GPA_BASE + mem.pages() * PAGE {
            return None;
        }
        self.next = addr + size;
        let layout = mem.layout;
        for page in (addr - GPA_BASE) / PAGE..(addr + size - GPA_BASE) / PAGE {
            mem.owned.insert(layout.perm(page));
        }
        Some(FakeBuf {
            mem: self.mem.clone(),
            addr,
            size: size as usize,
        })
    }

    fn translate(&self, addr: u64, len: usize) -> Option<u64> {
        let mem = self.mem.lock().unwrap();
        if mem.layout == Layout::Untranslatable {
            return None;
        }
        let bus = |a: u64| Some(mem.gpa_offset(a)? as u64 + mem.layout.bus_base());
        let first = bus(addr)?;
        // Contiguous: every byte's bus address follows the first's.
        let mut at = addr;
        while at < addr + len as u64 {
            if bus(at)? != first + (at - addr) {
                return None;
            }
            at = (at / PAGE + 1) * PAGE;
        }
        if len > 0 && bus(addr + len as u64 - 1)? != first + len as u64 - 1 {
            return None;
        }
        Some(first)
    }
}
