//! A disk-image file as a [`BlockDevice`]: positional reads and writes, `flush` = `fdatasync`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use volmgr::dev::{BLOCK, BLOCK_SIZE, check_range};
use volmgr::{BlockDevice, DevError};

/// An image file opened read-write, or read-only for inspection.
pub struct FileDisk {
    file: File,
    blocks: u64,
}

impl FileDisk {
    /// Opens `path`; with `create_size`, creates or extends it to that many bytes.
    pub fn open(path: &Path, create_size: Option<u64>) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create_size.is_some())
            .truncate(false)
            .open(path)?;
        if let Some(size) = create_size
            && file.metadata()?.len() < size
        {
            file.set_len(size)?;
        }
        let blocks = file.metadata()?.len() / BLOCK;
        Ok(Self { file, blocks })
    }

    /// Opens `path` read-only (writes then fail with an I/O error): for commands that only
    /// look, so they work on read-only images.
    pub fn open_read_only(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let blocks = file.metadata()?.len() / BLOCK;
        Ok(Self { file, blocks })
    }
}

impl BlockDevice for FileDisk {
    fn num_blocks(&self) -> u64 {
        self.blocks
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), DevError> {
        check_range(self.blocks, lba, buf.len())?;
        self.file
            .read_exact_at(buf, lba * BLOCK)
            .map_err(|_| DevError::Io)
    }
    fn write(&mut self, lba: u64, buf: &[u8]) -> Result<(), DevError> {
        check_range(self.blocks, lba, buf.len())?;
        self.file
            .write_all_at(buf, lba * BLOCK)
            .map_err(|_| DevError::Io)
    }
    fn flush(&mut self) -> Result<(), DevError> {
        self.file.sync_data().map_err(|_| DevError::Io)
    }
}

const _: () = assert!(BLOCK_SIZE == 4096);
