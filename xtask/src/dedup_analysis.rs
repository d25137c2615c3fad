//! `cargo xtask dedup-analysis TEMPLATE SOURCE`: where the bytes of a
//! `ferry pull --index` come from, and what 4 KiB block hashes would save
//! (issue 29 item 3; the figures and the decision:
//! docs/decisions/dedup-4k-blocks.md).
//!
//! Every 64 KiB chunk of the source is classified as ferry sees it: zero
//! (never crosses the wire), matched by the destination's index of the
//! template (`ferry_index::build` and `Index::matches`, the code
//! `ferry pull --index` uses: the same hash anywhere in the template at
//! 64 KiB alignment), or unmatched (fetched). Each unmatched chunk's 4 KiB
//! blocks are then classified: zero, found at 4 KiB alignment anywhere in
//! the template, or found nowhere. What ferry sends for the unmatched
//! chunks today (zstd level 1 per chunk, by `chunk_frame`'s rule) is set
//! against what only the found-nowhere blocks would cost, compressed per
//! chunk (the chunk's found-nowhere blocks together) and per block, and
//! against what 4 KiB hashes add to the manifest. Frame headers, the
//! manifest and transport overhead are not counted: payload bytes only.
//!
//! `--make-images DIR` first makes the template and the derived source in
//! DIR with `cargo xtask bench --dedup`'s own code
//! ([`crate::bench::dedup::make_images`]). The template's distinct 4 KiB
//! hashes are held in memory (about 50 bytes each: 12 MiB a GiB).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

/// The chunk ferry matches and sends (`ferry_index::CHUNK_SIZE`).
const CHUNK: usize = ferry_index::CHUNK_SIZE as usize;
/// The finer block measured.
pub(crate) const BLOCK: usize = 4096;
/// Bytes of one block hash in a manifest (BLAKE3).
const HASH_BYTES: u64 = 32;

/// Options of `cargo xtask dedup-analysis`.
#[derive(clap::Args, Debug)]
pub(crate) struct DedupAnalysisArgs {
    /// The destination's template image (what `ferry index build` indexes).
    #[arg(required_unless_present = "make_images")]
    template: Option<PathBuf>,
    /// The source image derived from it.
    #[arg(required_unless_present = "make_images")]
    source: Option<PathBuf>,
    /// Make `bench --dedup`'s template and derived source in this
    /// directory first (its own code), then analyse them.
    #[arg(long, conflicts_with_all = ["template", "source"])]
    make_images: Option<PathBuf>,
    /// With --make-images: the images' size (the bench's default).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Print the figures as JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// What the classification found (bytes are payload bytes).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Figures {
    /// The source's size.
    pub source_bytes: u64,
    /// 64 KiB chunks of the source (the last may be shorter).
    pub chunks: u64,
    /// Chunks of zeros only.
    pub zero_chunks: u64,
    /// Chunks whose hash the template's index holds.
    pub matched_chunks: u64,
    /// Bytes of those.
    pub matched_bytes: u64,
    /// Their payload as ferry sends them without an index: zstd level 1
    /// per chunk.
    pub matched_sent: u64,
    /// Chunks neither zero nor matched: fetched today.
    pub unmatched_chunks: u64,
    /// Bytes of those.
    pub unmatched_bytes: u64,
    /// Their payload as ferry sends them: zstd level 1 per chunk.
    pub unmatched_sent: u64,
    /// 4 KiB blocks of the unmatched chunks that are zeros.
    pub zero_blocks: u64,
    /// Blocks of the unmatched chunks found in the template at 4 KiB
    /// alignment.
    pub matched_blocks: u64,
    /// Bytes of those.
    pub matched_block_bytes: u64,
    /// Blocks of the unmatched chunks found nowhere.
    pub nowhere_blocks: u64,
    /// Bytes of those.
    pub nowhere_bytes: u64,
    /// The found-nowhere blocks' payload, each chunk's together in one
    /// zstd frame.
    pub nowhere_sent_per_chunk: u64,
    /// The found-nowhere blocks' payload, each block its own zstd frame.
    pub nowhere_sent_per_block: u64,
    /// Unmatched chunks with at least one block found in the template
    /// (the only ones 4 KiB hashes help).
    pub chunks_with_block_match: u64,
    /// Blocks of all unmatched chunks (4 KiB hashes for them alone).
    pub unmatched_chunk_blocks: u64,
    /// Blocks of all non-zero chunks (4 KiB hashes in every manifest entry).
    pub nonzero_chunk_blocks: u64,
    /// Distinct non-zero 4 KiB blocks of the template (records of a 4 KiB
    /// index).
    pub template_distinct_blocks: u64,
    /// Records of the template's 64 KiB index.
    pub template_index_records: u64,
}

impl Figures {
    /// Wire payload 4 KiB matching saves at most (blocks of each chunk
    /// compressed together), before its manifest cost.
    pub(crate) fn saved_ceiling(&self) -> u64 {
        self.unmatched_sent
            .saturating_sub(self.nowhere_sent_per_chunk)
    }
}

/// The payload ferry sends for `data`: its zstd level 1 form when that
/// saves at least 3% (then its length field too), else the bytes as they
/// are. The rule of `chunk_frame` (transport/src/codec.rs).
fn sent_len(z: &mut zstd::bulk::Compressor<'static>, data: &[u8]) -> Result<u64> {
    if data.is_empty() {
        return Ok(0);
    }
    let c = z.compress(data).context("zstd")?;
    Ok(if c.len() + 4 < data.len() - data.len() / 33 {
        c.len() as u64 + 4
    } else {
        data.len() as u64
    })
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|x| *x == 0)
}

fn hash(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

/// Reads `buf.len()` bytes or to the end of the file; returns how many.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Calls `each(index, bytes)` for every `CHUNK` of `path`, in order.
fn for_each_chunk(path: &Path, mut each: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut i = 0u64;
    loop {
        let n =
            read_full(&mut f, &mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        each(i, &buf[..n])?;
        i += 1;
    }
}

/// Classifies `source`'s chunks and blocks against `template` (see the
/// module documentation). The 64 KiB matches come from an index of the
/// template built in a temporary directory by `ferry_index`.
pub(crate) fn classify(template: &Path, source: &Path) -> Result<Figures> {
    let mut fig = Figures::default();
    // The template's 4 KiB blocks at 4 KiB alignment, zeros left out.
    let mut blocks: HashSet<[u8; 32]> = HashSet::new();
    for_each_chunk(template, |_, c| {
        for b in c.chunks(BLOCK) {
            if !is_zero(b) {
                blocks.insert(hash(b));
            }
        }
        Ok(())
    })?;
    fig.template_distinct_blocks = blocks.len() as u64;
    // The 64 KiB matches, by ferry's index.
    let tmp = tempfile::tempdir().context("a temporary directory for the index")?;
    let index_path = tmp.path().join("template.ferry-index");
    ferry_index::build(&index_path, &[template.to_path_buf()]).context("indexing the template")?;
    let index = ferry_index::Index::open(&index_path).context("opening the index")?;
    fig.template_index_records = index.records();
    let mut wanted: Vec<([u8; 32], u64)> = Vec::new();
    for_each_chunk(source, |i, c| {
        fig.chunks += 1;
        fig.source_bytes += c.len() as u64;
        if is_zero(c) {
            fig.zero_chunks += 1;
        } else {
            wanted.push((hash(c), i));
        }
        Ok(())
    })?;
    wanted.sort_unstable();
    let mut matched = vec![false; fig.chunks as usize];
    for (i, _) in index.matches(&wanted).context("matching the source")? {
        matched[i as usize] = true;
    }
    // The unmatched chunks' blocks.
    let mut z = zstd::bulk::Compressor::new(1).context("zstd")?;
    let mut nowhere = Vec::with_capacity(CHUNK);
    for_each_chunk(source, |i, c| {
        if is_zero(c) {
            return Ok(());
        }
        let n_blocks = c.len().div_ceil(BLOCK) as u64;
        fig.nonzero_chunk_blocks += n_blocks;
        if matched[i as usize] {
            fig.matched_chunks += 1;
            fig.matched_bytes += c.len() as u64;
            fig.matched_sent += sent_len(&mut z, c)?;
            return Ok(());
        }
        fig.unmatched_chunks += 1;
        fig.unmatched_bytes += c.len() as u64;
        fig.unmatched_chunk_blocks += n_blocks;
        fig.unmatched_sent += sent_len(&mut z, c)?;
        nowhere.clear();
        let mut any_match = false;
        for b in c.chunks(BLOCK) {
            if is_zero(b) {
                fig.zero_blocks += 1;
            } else if blocks.contains(&hash(b)) {
                fig.matched_blocks += 1;
                fig.matched_block_bytes += b.len() as u64;
                any_match = true;
            } else {
                fig.nowhere_blocks += 1;
                fig.nowhere_bytes += b.len() as u64;
                fig.nowhere_sent_per_block += sent_len(&mut z, b)?;
                nowhere.extend_from_slice(b);
            }
        }
        fig.nowhere_sent_per_chunk += sent_len(&mut z, &nowhere)?;
        fig.chunks_with_block_match += u64::from(any_match);
        Ok(())
    })?;
    Ok(fig)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

/// The figures as text.
fn report(f: &Figures) -> String {
    let pct = |a: u64, b: u64| {
        if b == 0 {
            0.0
        } else {
            a as f64 * 100.0 / b as f64
        }
    };
    let hashes_unmatched = f.unmatched_chunk_blocks * HASH_BYTES;
    let hashes_helpful = f.chunks_with_block_match * (CHUNK / BLOCK) as u64 * HASH_BYTES;
    let hashes_all = f.nonzero_chunk_blocks * HASH_BYTES;
    let plain = f.matched_sent + f.unmatched_sent;
    format!(
        "source: {} in {} chunks of 64 KiB\n\
         zero chunks:      {:>8} ({})\n\
         matched (64 KiB): {:>8} ({}; sent without an index: {})\n\
         unmatched:        {:>8} ({}; sent today, zstd 1 per chunk: {})\n\
         blocks of the unmatched chunks (4 KiB):\n\
         \x20 zero:                          {:>8} ({})\n\
         \x20 in the template (4 KiB):       {:>8} ({})\n\
         \x20 nowhere:                       {:>8} ({})\n\
         \x20 unmatched chunks with a 4 KiB match: {} of {}\n\
         nowhere blocks sent, zstd 1 per chunk: {} ({:.0}% of today's unmatched payload)\n\
         nowhere blocks sent, zstd 1 per block: {}\n\
         wire payload 4 KiB matching saves at most: {} ({:.0}% of today's unmatched payload)\n\
         payload without an index {}, with it {} (-{:.0}%), with 4 KiB matching at best {} (-{:.0}%)\n\
         manifest cost of 4 KiB hashes (32 B each): unmatched chunks {}, unmatched chunks with a 4 KiB match {}, every non-zero chunk {}\n\
         destination index: 64 KiB {} records, 4 KiB {} records (48 B each: {} vs {})\n",
        mib(f.source_bytes),
        f.chunks,
        f.zero_chunks,
        mib(f.source_bytes - f.matched_bytes - f.unmatched_bytes),
        f.matched_chunks,
        mib(f.matched_bytes),
        mib(f.matched_sent),
        f.unmatched_chunks,
        mib(f.unmatched_bytes),
        mib(f.unmatched_sent),
        f.zero_blocks,
        mib(f.unmatched_bytes - f.matched_block_bytes - f.nowhere_bytes),
        f.matched_blocks,
        mib(f.matched_block_bytes),
        f.nowhere_blocks,
        mib(f.nowhere_bytes),
        f.chunks_with_block_match,
        f.unmatched_chunks,
        mib(f.nowhere_sent_per_chunk),
        pct(f.nowhere_sent_per_chunk, f.unmatched_sent),
        mib(f.nowhere_sent_per_block),
        mib(f.saved_ceiling()),
        pct(f.saved_ceiling(), f.unmatched_sent),
        mib(plain),
        mib(f.unmatched_sent),
        pct(plain - f.unmatched_sent, plain),
        mib(f.nowhere_sent_per_chunk),
        pct(plain - f.nowhere_sent_per_chunk, plain),
        mib(hashes_unmatched),
        mib(hashes_helpful),
        mib(hashes_all),
        f.template_index_records,
        f.template_distinct_blocks,
        mib(f.template_index_records * 48),
        mib(f.template_distinct_blocks * 48),
    )
}

/// Runs `cargo xtask dedup-analysis`.
pub(crate) fn run(a: &DedupAnalysisArgs) -> Result<()> {
    let (template, source) = match (&a.make_images, &a.template, &a.source) {
        (Some(dir), _, _) => {
            crate::setup::ensure(crate::bench::dedup::NEEDS)?;
            std::fs::create_dir_all(dir)?;
            let (t, s, desc, derived) = crate::bench::dedup::make_images(dir, a.size_mib)?;
            eprintln!("dedup-analysis: template {desc}");
            eprintln!("dedup-analysis: source {}", derived.summary());
            (t, s)
        }
        (None, Some(t), Some(s)) => (t.clone(), s.clone()),
        _ => bail!("give TEMPLATE and SOURCE, or --make-images DIR"),
    };
    let f = classify(&template, &source)?;
    if a.json {
        let v = json!({
            "template": template,
            "source": source,
            "source_bytes": f.source_bytes,
            "chunks": f.chunks,
            "zero_chunks": f.zero_chunks,
            "matched_chunks": f.matched_chunks,
            "matched_bytes": f.matched_bytes,
            "matched_sent": f.matched_sent,
            "unmatched_chunks": f.unmatched_chunks,
            "unmatched_bytes": f.unmatched_bytes,
            "unmatched_sent": f.unmatched_sent,
            "zero_blocks": f.zero_blocks,
            "matched_blocks": f.matched_blocks,
            "matched_block_bytes": f.matched_block_bytes,
            "nowhere_blocks": f.nowhere_blocks,
            "nowhere_bytes": f.nowhere_bytes,
            "nowhere_sent_per_chunk": f.nowhere_sent_per_chunk,
            "nowhere_sent_per_block": f.nowhere_sent_per_block,
            "chunks_with_block_match": f.chunks_with_block_match,
            "saved_ceiling": f.saved_ceiling(),
            "hash_bytes_unmatched_chunks": f.unmatched_chunk_blocks * HASH_BYTES,
            "hash_bytes_nonzero_chunks": f.nonzero_chunk_blocks * HASH_BYTES,
            "template_index_records": f.template_index_records,
            "template_distinct_blocks": f.template_distinct_blocks,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", report(&f));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` bytes zstd cannot shrink (BLAKE3's output stream of `seed`).
    fn noise(seed: u8, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        blake3::Hasher::new()
            .update(&[seed])
            .finalize_xof()
            .fill(&mut out);
        out
    }

    /// A template and a source with one chunk of each kind; every count
    /// follows from how they are made.
    #[test]
    fn classifies_chunks_and_blocks() {
        let dir = tempfile::tempdir().unwrap();
        // Template: chunk 0 noise A, chunk 1 noise B, chunk 2 zeros.
        let a = noise(1, CHUNK);
        let b = noise(2, CHUNK);
        let mut t = Vec::new();
        t.extend_from_slice(&a);
        t.extend_from_slice(&b);
        t.extend_from_slice(&vec![0; CHUNK]);
        // Source: chunk 0 zeros; chunk 1 = B (matched, at another offset);
        // chunk 2 = blocks 0..3 of A's block 5 (found), one zero block,
        // A shifted by 512 bytes (nowhere: not 4 KiB aligned), new noise.
        let mut s = vec![0u8; CHUNK];
        s.extend_from_slice(&b);
        let mut c = Vec::new();
        for _ in 0..3 {
            c.extend_from_slice(&a[5 * BLOCK..6 * BLOCK]);
        }
        c.extend_from_slice(&[0; BLOCK]);
        c.extend_from_slice(&a[512..512 + BLOCK]);
        c.extend_from_slice(&noise(3, CHUNK - c.len()));
        assert_eq!(c.len(), CHUNK);
        s.extend_from_slice(&c);
        // A short last chunk: one block of B (found), half a block of noise.
        s.extend_from_slice(&b[BLOCK..2 * BLOCK]);
        s.extend_from_slice(&noise(4, BLOCK / 2));
        let (tp, sp) = (dir.path().join("t.img"), dir.path().join("s.img"));
        std::fs::write(&tp, &t).unwrap();
        std::fs::write(&sp, &s).unwrap();

        let f = classify(&tp, &sp).unwrap();
        assert_eq!(f.source_bytes, s.len() as u64);
        assert_eq!(f.chunks, 4);
        assert_eq!(f.zero_chunks, 1);
        assert_eq!(f.matched_chunks, 1);
        assert_eq!(f.matched_bytes, CHUNK as u64);
        assert_eq!(f.matched_sent, CHUNK as u64, "noise is sent as it is");
        assert_eq!(f.unmatched_chunks, 2);
        assert_eq!(f.unmatched_bytes, (CHUNK + BLOCK + BLOCK / 2) as u64);
        assert_eq!(f.zero_blocks, 1);
        assert_eq!(f.matched_blocks, 3 + 1);
        assert_eq!(f.matched_block_bytes, 4 * BLOCK as u64);
        // Chunk 2: the shifted block and 11 blocks of new noise; the last
        // chunk: half a block.
        assert_eq!(f.nowhere_blocks, 12 + 1);
        assert_eq!(f.nowhere_bytes, (12 * BLOCK + BLOCK / 2) as u64);
        // Noise does not compress: sent as it is, either way.
        assert_eq!(f.nowhere_sent_per_block, f.nowhere_bytes);
        assert_eq!(f.nowhere_sent_per_chunk, f.nowhere_bytes);
        assert_eq!(f.chunks_with_block_match, 2);
        assert_eq!(f.unmatched_chunk_blocks, 16 + 2);
        assert_eq!(f.nonzero_chunk_blocks, 16 + 16 + 2);
        assert_eq!(f.template_index_records, 2);
        assert_eq!(f.template_distinct_blocks, 32);
        // Today chunk 2 goes whole (its repeats and zeros compress a little).
        assert!(f.unmatched_sent > f.nowhere_sent_per_chunk);
        assert!(f.unmatched_sent < f.unmatched_bytes);
        assert_eq!(
            f.saved_ceiling(),
            f.unmatched_sent - f.nowhere_sent_per_chunk
        );
    }

    /// The payload rule: text is sent compressed, noise as it is.
    #[test]
    fn sent_len_follows_chunk_frame() {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let text = b"ferry moves disks ".repeat(4000);
        let sent = sent_len(&mut z, &text).unwrap();
        assert!(sent < text.len() as u64 / 10, "{sent}");
        let n = noise(9, CHUNK);
        assert_eq!(sent_len(&mut z, &n).unwrap(), CHUNK as u64);
        assert_eq!(sent_len(&mut z, &[]).unwrap(), 0);
    }
}
