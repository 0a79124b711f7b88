//! The durable spool, opt-in (`USAGE_SPOOL_DIR`): every admitted call is appended to a
//! local file and made durable (`fdatasync`, one per group of calls that arrived
//! together) before its response goes out. The tracker deletes a file once every call in
//! it is stored; files left by a crash are replayed at the next start. Replays are
//! harmless: events keep their ids, and the store skips ids it already has.
//!
//! Without the spool, a SIGKILL loses the calls still in the tracker's queue; with it,
//! none whose response was sent (see docs/SCALING.md for the bound and the cost).
//!
//! Files are `<sequence>.spool`, one line per call, tab-separated:
//! `event_id user_id api_key_id endpoint method status ms created_at_ns included|-`.
//! A line without its end (torn by the crash) was never acknowledged and is skipped.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;

use time::OffsetDateTime;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::event::TrackedCall;
use crate::{ApiKeyId, UsageEvent, UserId};

/// Spool settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Where the files go (created if missing). One directory per running instance.
    pub dir: PathBuf,
    /// Calls per file before the next file starts.
    pub calls_per_file: u64,
}

impl SpoolConfig {
    /// A spool in `dir` with 10,000 calls per file.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            calls_per_file: 10_000,
        }
    }
}

/// The spool could not keep a call.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Writing or syncing the file failed.
    #[error("spool I/O failed: {0}")]
    Io(String),
    /// The spool was closed.
    #[error("the spool is closed")]
    Closed,
}

/// Calls written to each file and not yet stored; files done with are deleted.
#[derive(Debug)]
struct Files {
    dir: PathBuf,
    outstanding: HashMap<u64, u64>,
    /// The file being appended to; every other file in `outstanding` is sealed.
    current: u64,
}

impl Files {
    fn path(&self, seq: u64) -> PathBuf {
        file_path(&self.dir, seq)
    }

    /// Deletes `seq` when sealed and fully stored.
    fn delete_if_done(&mut self, seq: u64) {
        if seq != self.current && self.outstanding.get(&seq) == Some(&0) {
            self.outstanding.remove(&seq);
            if let Err(e) = fs::remove_file(self.path(seq)) {
                tracing::warn!(error = %e, file = seq, "removing a spool file failed");
            }
        }
    }
}

fn file_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.spool"))
}

enum Request {
    Append {
        line: String,
        done: oneshot::Sender<Result<u64, SpoolError>>,
    },
    Close,
}

/// The spool: [`Spool::append`] returns once the call is on disk.
#[derive(Debug)]
pub struct Spool {
    tx: Mutex<Option<mpsc::Sender<Request>>>,
    files: Arc<Mutex<Files>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Calls found in the spool at start, to be stored again, with the file each came from.
pub type Replay = Vec<(u64, TrackedCall)>;

impl Spool {
    /// Opens the spool in `config.dir`: reads what a previous run left (to replay) and
    /// starts a new file.
    pub fn open(config: &SpoolConfig) -> Result<(Self, Replay), SpoolError> {
        let io = |e: io::Error| SpoolError::Io(format!("{}: {e}", config.dir.display()));
        fs::create_dir_all(&config.dir).map_err(io)?;
        let mut found: Vec<u64> = fs::read_dir(&config.dir)
            .map_err(io)?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name();
                name.to_str()?.strip_suffix(".spool")?.parse().ok()
            })
            .collect();
        found.sort_unstable();
        let mut replay = Vec::new();
        let mut outstanding = HashMap::new();
        for &seq in &found {
            let calls = read_file(&file_path(&config.dir, seq)).map_err(io)?;
            outstanding.insert(seq, calls.len() as u64);
            replay.extend(calls.into_iter().map(|c| (seq, c)));
        }
        let current = found.last().map_or(1, |last| last + 1);
        let mut files = Files {
            dir: config.dir.clone(),
            outstanding,
            current,
        };
        for seq in found {
            files.delete_if_done(seq); // empty files
        }
        files.outstanding.insert(current, 0);
        let file = create_file(&files.path(current)).map_err(io)?;
        let files = Arc::new(Mutex::new(files));
        let (tx, rx) = mpsc::channel();
        let writer = {
            let files = Arc::clone(&files);
            let per_file = config.calls_per_file.max(1);
            std::thread::Builder::new()
                .name("usage-spool".into())
                .spawn(move || write_loop(rx, file, files, per_file))
                .map_err(io)?
        };
        if !replay.is_empty() {
            tracing::info!(calls = replay.len(), "replaying the usage spool");
        }
        Ok((
            Self {
                tx: Mutex::new(Some(tx)),
                files,
                writer: Mutex::new(Some(writer)),
            },
            replay,
        ))
    }

    /// Appends `call` and waits until it is on disk. Returns the file it went to, for
    /// [`Spool::stored`].
    pub async fn append(&self, call: &TrackedCall) -> Result<u64, SpoolError> {
        let (done, wait) = oneshot::channel();
        let line = encode(call);
        let sent = lock(&self.tx)
            .as_ref()
            .map(|tx| tx.send(Request::Append { line, done }).is_ok());
        if sent != Some(true) {
            return Err(SpoolError::Closed);
        }
        wait.await.unwrap_or(Err(SpoolError::Closed))
    }

    /// Notes that `calls` calls of file `seq` are stored; deletes the file when it is
    /// sealed and all of its calls are.
    pub fn stored(&self, seq: u64, calls: u64) {
        let mut files = lock(&self.files);
        if let Some(n) = files.outstanding.get_mut(&seq) {
            *n = n.saturating_sub(calls);
        }
        files.delete_if_done(seq);
    }

    /// Stops taking calls, seals the last file, and deletes it if all of its calls are
    /// stored. Files with calls not yet stored stay, to be replayed at the next start.
    pub fn close(&self) {
        if let Some(tx) = lock(&self.tx).take() {
            let _ = tx.send(Request::Close);
        }
        if let Some(writer) = lock(&self.writer).take() {
            let _ = writer.join();
        }
        let mut files = lock(&self.files);
        let last = files.current;
        files.current = 0;
        files.delete_if_done(last);
        let left: u64 = files.outstanding.values().sum();
        if left > 0 {
            tracing::warn!(
                calls = left,
                "usage spool kept calls not yet stored; they are replayed at the next start"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn create_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    // The new name must survive a crash too.
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

/// The writer thread: takes every request waiting, writes them, syncs once, answers.
fn write_loop(
    rx: mpsc::Receiver<Request>,
    mut file: File,
    files: Arc<Mutex<Files>>,
    per_file: u64,
) {
    let mut in_file = 0u64;
    let mut buf = String::new();
    let mut group = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut closing = false;
        for request in std::iter::once(first).chain(rx.try_iter()) {
            match request {
                Request::Append { line, done } => {
                    buf.push_str(&line);
                    group.push(done);
                }
                Request::Close => closing = true,
            }
        }
        let result = file
            .write_all(buf.as_bytes())
            .and_then(|()| file.sync_data());
        buf.clear();
        let seq = lock(&files).current;
        match result {
            Ok(()) => {
                let n = group.len() as u64;
                *lock(&files).outstanding.entry(seq).or_insert(0) += n;
                in_file += n;
                for done in group.drain(..) {
                    let _ = done.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "writing the usage spool failed");
                for done in group.drain(..) {
                    let _ = done.send(Err(SpoolError::Io(e.to_string())));
                }
                // The file may now end in a part of a line, and after a failed sync its
                // pages cannot be trusted: the next call starts a new file, so this one
                // only ever loses its torn end.
                in_file = per_file;
            }
        }
        if closing {
            return;
        }
        if in_file >= per_file {
            let mut f = lock(&files);
            let next = f.current + 1;
            match create_file(&f.path(next)) {
                Ok(new) => {
                    let sealed = f.current;
                    f.current = next;
                    f.outstanding.insert(next, 0);
                    f.delete_if_done(sealed);
                    file = new;
                    in_file = 0;
                }
                Err(e) => tracing::error!(error = %e, "starting a new spool file failed"),
            }
        }
    }
}

/// Endpoints and methods come from the application's routes; a tab or line break in
/// one would break the line, so they are replaced.
fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains(['\t', '\n', '\r']) {
        s.replace(['\t', '\n', '\r'], " ").into()
    } else {
        s.into()
    }
}

fn encode(call: &TrackedCall) -> String {
    let e = &call.event;
    let included = call
        .included_calls
        .map_or_else(|| "-".to_owned(), |n| n.to_string());
    // Units last, and only when there are some: a line without them reads as before.
    let units = e
        .units
        .to_stored()
        .map_or_else(String::new, |u| format!("\t{u}"));
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}{}\n",
        e.event_id.hyphenated(),
        e.user_id,
        e.api_key_id,
        clean(&e.endpoint),
        clean(&e.method),
        e.status_code,
        e.response_time_ms,
        e.created_at.unix_timestamp_nanos(),
        included,
        units
    )
}

fn decode(line: &str) -> Option<TrackedCall> {
    let mut f = line.split('\t');
    let mut next = || f.next();
    let mut event = UsageEvent {
        event_id: Uuid::parse_str(next()?).ok()?,
        user_id: UserId::parse(next()?).ok()?,
        api_key_id: ApiKeyId::parse(next()?).ok()?,
        endpoint: next()?.to_owned(),
        method: next()?.to_owned(),
        status_code: next()?.parse().ok()?,
        response_time_ms: next()?.parse().ok()?,
        created_at: OffsetDateTime::from_unix_timestamp_nanos(next()?.parse().ok()?).ok()?,
        units: Default::default(),
    };
    let included_calls = match next()? {
        "-" => None,
        n => Some(n.parse().ok()?),
    };
    if let Some(units) = next() {
        event.units = crate::event::Units::from_stored(Some(units))?;
    }
    next().is_none().then_some(TrackedCall {
        event,
        included_calls,
    })
}

/// The complete lines of a spool file.
fn read_file(path: &Path) -> io::Result<Vec<TrackedCall>> {
    let mut calls = Vec::new();
    let mut reader = BufReader::new(File::open(path)?);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            break;
        }
        let Some(complete) = line.strip_suffix('\n') else {
            tracing::warn!(file = %path.display(), "skipping a torn last line of the usage spool");
            break;
        };
        match decode(complete) {
            Some(call) => calls.push(call),
            None => {
                tracing::warn!(file = %path.display(), "skipping an unreadable usage spool line")
            }
        }
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn call(i: u32) -> TrackedCall {
        TrackedCall {
            event: UsageEvent {
                event_id: crate::event::new_event_id(datetime!(2026-11-22 10:00 UTC)),
                user_id: UserId::generate(),
                api_key_id: ApiKeyId::generate(),
                endpoint: "/api/v1/items/{id}".into(),
                method: "GET".into(),
                status_code: 200,
                response_time_ms: i,
                created_at: datetime!(2026-11-22 10:00:00.123456 UTC),
                units: Default::default(),
            },
            included_calls: i.is_multiple_of(2).then_some(100_000),
        }
    }

    fn temp_dir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("usage-spool-{}", crate::ids::random_base62(12)));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn spool_files(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn lines_read_back_as_written() {
        // A line written before units existed (nine fields) still reads.
        let old = "0193b1e0-0000-7000-8000-000000000000\teco_usr_a\teco_key_b\t/x\tGET\t200\t3\t1763805600000000000\t-";
        assert!(decode(old).unwrap().event.units.is_empty());
        assert!(decode(&format!("{old}\tTokens=1")).is_none(), "bad units");
        for i in 0..4 {
            let mut c = call(i);
            if i == 3 {
                c.event.units.add("tokens", 1_234);
                c.event.units.add("credits", 10);
            }
            let back = decode(encode(&c).trim_end_matches('\n')).unwrap();
            assert_eq!(back.event, c.event);
            assert_eq!(back.included_calls, c.included_calls);
        }
        let mut odd = call(1);
        odd.event.endpoint = "/a\tb\nc".into();
        assert_eq!(
            decode(encode(&odd).trim_end_matches('\n'))
                .unwrap()
                .event
                .endpoint,
            "/a b c"
        );
        assert!(decode("").is_none());
        assert!(decode("not\ta\tline").is_none());
    }

    #[tokio::test]
    async fn what_a_crash_leaves_is_replayed_and_stored_files_are_deleted() {
        let dir = temp_dir();
        let config = SpoolConfig {
            dir: dir.clone(),
            calls_per_file: 3,
        };
        let (spool, replay) = Spool::open(&config).unwrap();
        assert!(replay.is_empty());
        let calls: Vec<TrackedCall> = (0..7).map(call).collect();
        let mut seqs = Vec::new();
        for c in &calls {
            seqs.push(spool.append(c).await.unwrap());
        }
        assert_eq!(seqs, vec![1, 1, 1, 2, 2, 2, 3], "three calls per file");
        // The first file's calls are stored: it goes. The rest are "lost in a crash".
        spool.stored(1, 3);
        assert_eq!(spool_files(&dir), 2);
        // A torn line, as a crash in the middle of a write leaves.
        let mut f = OpenOptions::new()
            .append(true)
            .open(file_path(&dir, 3))
            .unwrap();
        f.write_all(b"0190a2b4-torn").unwrap();
        drop(spool); // a crash: no close

        let (spool, replay) = Spool::open(&config).unwrap();
        let ids: Vec<Uuid> = replay.iter().map(|(_, c)| c.event.event_id).collect();
        let expected: Vec<Uuid> = calls[3..].iter().map(|c| c.event.event_id).collect();
        assert_eq!(
            ids, expected,
            "the four unstored calls, the torn line skipped"
        );
        assert_eq!(spool.append(&call(9)).await.unwrap(), 4, "a new file");
        // Replayed calls stored: their files go; the new file goes at close.
        spool.stored(2, 3);
        spool.stored(3, 1);
        spool.stored(4, 1);
        spool.close();
        assert_eq!(spool_files(&dir), 0);
        assert!(matches!(
            spool.append(&call(1)).await,
            Err(SpoolError::Closed)
        ));
        let (_, replay) = Spool::open(&config).unwrap();
        assert!(replay.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_file_with_calls_not_stored_stays_for_the_next_start() {
        let dir = temp_dir();
        let config = SpoolConfig::new(&dir);
        let (spool, _) = Spool::open(&config).unwrap();
        let c = call(0);
        let seq = spool.append(&c).await.unwrap();
        spool.close(); // the database never came back
        let (_, replay) = Spool::open(&config).unwrap();
        assert_eq!(replay.len(), 1);
        assert_eq!((replay[0].0, &replay[0].1.event), (seq, &c.event));
        fs::remove_dir_all(&dir).unwrap();
    }
}
