//! The model's DMA side: the receive ring (frames and hostile write-backs into the
//! descriptors from RDH up to RDT) and the transmit ring (descriptors from TDH up to TDT
//! fetched, frames captured, DD written back), every access checked by
//! `PhysMem::dma_offset`.

use super::{
    ICR, ICR_RXT0, ICR_TXDW, RCTL, RCTL_BSEX, RCTL_EN, RCTL_SECRC, RDBAL, RDH, RDLEN, RDT, RXD_DD,
    RXD_EOP, RxWrite, State, TCTL, TCTL_EN, TDBAL, TDH, TDLEN, TDT, TXD_DD, TXD_DEXT, TXD_EOP,
    TXD_IFCS, TXD_RS,
};

impl State {
    pub(super) fn slots(&self, len_reg: u32) -> u32 {
        self.get(len_reg) / 16
    }

    pub(super) fn ring_base(&self, lo: u32) -> u64 {
        u64::from(self.get(lo + 4)) << 32 | u64::from(self.get(lo))
    }

    pub(super) fn read_desc(&self, bus: u64) -> [u8; 16] {
        let mem = self.mem.lock().unwrap();
        let at = mem.dma_offset(bus, 16);
        mem.bytes[at..at + 16].try_into().unwrap()
    }

    pub(super) fn write_mem(&self, bus: u64, data: &[u8]) {
        let mut mem = self.mem.lock().unwrap();
        let at = mem.dma_offset(bus, data.len() as u64);
        mem.bytes[at..at + data.len()].copy_from_slice(data);
    }

    pub(super) fn read_mem(&self, bus: u64, len: usize) -> Vec<u8> {
        let mem = self.mem.lock().unwrap();
        let at = mem.dma_offset(bus, len as u64);
        mem.bytes[at..at + len].to_vec()
    }

    /// Receive buffer size from RCTL.BSIZE and BSEX.
    pub(super) fn rx_buf_size(&self) -> usize {
        let rctl = self.get(RCTL);
        let bsize = (rctl >> 16) & 3;
        if rctl & RCTL_BSEX != 0 {
            [2048 * 8, 16384, 8192, 4096][bsize as usize]
        } else {
            [2048, 1024, 512, 256][bsize as usize]
        }
    }

    /// Descriptors the device owns: from RDH up to RDT.
    pub(super) fn rx_free(&self) -> u32 {
        let n = self.slots(RDLEN);
        if n == 0 {
            return 0;
        }
        (self.get(RDT) + n - self.get(RDH)) % n
    }

    pub(super) fn receive(&mut self, frame: &[u8]) -> bool {
        if self.get(RCTL) & RCTL_EN == 0 {
            return false;
        }
        let mut data = frame.to_vec();
        if self.get(RCTL) & RCTL_SECRC == 0 {
            // The frame check sequence stays (a stand-in value: no CRC is computed).
            data.extend_from_slice(&[0xC0, 0xC1, 0xC2, 0xC3]);
        }
        let size = self.rx_buf_size();
        let pieces = data.len().div_ceil(size).max(1);
        if (self.rx_free() as usize) < pieces {
            self.missed += 1;
            return false;
        }
        let mut chunks = data.chunks(size).peekable();
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            assert!(self.write_back(&RxWrite {
                data: chunk.to_vec(),
                length: u16::try_from(chunk.len()).unwrap(),
                status: if last { RXD_EOP } else { 0 },
                errors: 0,
                addr: None,
            }));
        }
        true
    }

    pub(super) fn write_back(&mut self, w: &RxWrite) -> bool {
        if self.get(RCTL) & RCTL_EN == 0 || self.rx_free() == 0 {
            return false;
        }
        let head = self.get(RDH);
        let desc_bus = self.ring_base(RDBAL) + 16 * u64::from(head);
        let d = self.read_desc(desc_bus);
        let buf = u64::from_le_bytes(d[0..8].try_into().unwrap());
        let n = w.data.len().min(self.rx_buf_size());
        if n > 0 {
            self.write_mem(buf, &w.data[..n]);
        }
        let mut out = [0u8; 16];
        out[0..8].copy_from_slice(&w.addr.unwrap_or(buf).to_le_bytes());
        out[8..10].copy_from_slice(&w.length.to_le_bytes());
        // Bochs ORs the new status into what the descriptor held: so does the model, and a
        // driver that does not clear status before posting sees stale bits.
        out[12] = d[12] | w.status | RXD_DD;
        out[13] = w.errors;
        self.write_mem(desc_bus, &out);
        self.set(RDH, (head + 1) % self.slots(RDLEN));
        let icr = self.get(ICR) | ICR_RXT0;
        self.set(ICR, icr);
        true
    }

    pub(super) fn process_tx(&mut self) {
        if self.get(TCTL) & TCTL_EN == 0 {
            return;
        }
        let n = self.slots(TDLEN);
        while self.get(TDH) != self.get(TDT) {
            let head = self.get(TDH);
            let desc_bus = self.ring_base(TDBAL) + 16 * u64::from(head);
            let d = self.read_desc(desc_bus);
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
            let length = usize::from(u16::from_le_bytes([d[8], d[9]]));
            let cmd = d[11];
            assert_eq!(cmd & TXD_DEXT, 0, "not a legacy descriptor");
            assert_eq!(
                cmd & (TXD_EOP | TXD_IFCS | TXD_RS),
                TXD_EOP | TXD_IFCS | TXD_RS,
                "descriptor command {cmd:#04x}"
            );
            assert!((14..=1518).contains(&length), "frame of {length} bytes");
            let data = self.read_mem(addr, length);
            self.tx_partial.extend_from_slice(&data);
            if cmd & TXD_EOP != 0 {
                let frame = std::mem::take(&mut self.tx_partial);
                self.sent.push(frame);
            }
            if cmd & TXD_RS != 0 {
                self.write_mem(desc_bus + 12, &[d[12] | TXD_DD]);
            }
            self.set(TDH, (head + 1) % n);
        }
        let icr = self.get(ICR) | ICR_TXDW;
        self.set(ICR, icr);
    }
}
