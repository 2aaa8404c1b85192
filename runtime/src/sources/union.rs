//! Several sources read as one: a job graph stream's `from: [a, b]`.
//!
//! Each poll takes what every part has ready (without waiting), then, when
//! none had anything, waits on each in turn for a slice of the time asked.
//! Every item is marked with its part ([`super::RawItem::source`]), so
//! event time keeps a watermark per part and takes the least of them, as
//! Flink does for the inputs of a union; a part that ends is reported in
//! [`super::RawBatch::finished`] (its event time becomes +infinity) and
//! the union ends when every part has.
//!
//! The position is every part's position; a restart seeks each part.

use super::{CheckpointHook, Poll, RawBatch, Source, SourceError, TopicBinder};
use std::time::Duration;

/// One part: the source, its name, its largest accepted payload.
pub struct Part {
    pub name: String,
    pub source: Box<dyn Source>,
    pub max_payload: usize,
}

pub struct UnionSource {
    parts: Vec<Part>,
    ended: Vec<bool>,
    /// The part the next poll starts with (each gets its turn first).
    next: usize,
}

impl UnionSource {
    /// A union of at least one part (at most 65536).
    pub fn new(parts: Vec<Part>) -> Self {
        UnionSource {
            ended: vec![false; parts.len()],
            parts,
            next: 0,
        }
    }

    /// Polls part `i`, marks its new items; `Ok(true)` when it ended now.
    fn poll_part(
        &mut self,
        i: usize,
        batch: &mut RawBatch,
        room: usize,
        wait: Duration,
    ) -> Result<bool, SourceError> {
        let before = batch.items.len();
        let part = &mut self.parts[i];
        let polled = part.source.poll(batch, room, part.max_payload, wait)?;
        for it in &mut batch.items[before..] {
            it.source = i as u16;
        }
        if polled == Poll::Finished && !self.ended[i] {
            self.ended[i] = true;
            return Ok(true);
        }
        Ok(false)
    }
}

/// The parts' positions, one `Option` each.
type Positions = Vec<Option<Vec<u8>>>;

impl Source for UnionSource {
    fn describe(&self) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|p| format!("{} ({})", p.name, p.source.describe()))
            .collect();
        format!("union of {}", parts.join(", "))
    }

    fn start(&mut self, ctx: &crate::context::RunContext) {
        for p in &mut self.parts {
            p.source.start(ctx);
        }
    }

    fn poll(
        &mut self,
        batch: &mut RawBatch,
        max_items: usize,
        _max_payload: usize,
        wait: Duration,
    ) -> Result<Poll, SourceError> {
        let n = self.parts.len();
        let mut finished = Vec::new();
        let start = batch.items.len();
        // What is ready, each part in turn.
        for k in 0..n {
            let i = (self.next + k) % n;
            let room = max_items.saturating_sub(batch.items.len() - start);
            if self.ended[i] || room == 0 {
                continue;
            }
            if self.poll_part(i, batch, room, Duration::ZERO)? {
                finished.push(i as u16);
            }
        }
        // Nothing ready: wait on each open part for a slice of `wait`.
        let open = self.ended.iter().filter(|e| !**e).count();
        if batch.items.len() == start && finished.is_empty() && open > 0 {
            let slice = wait / open as u32;
            for k in 0..n {
                let i = (self.next + k) % n;
                if self.ended[i] {
                    continue;
                }
                if self.poll_part(i, batch, max_items, slice)? {
                    finished.push(i as u16);
                }
                if batch.items.len() > start {
                    break;
                }
            }
        }
        self.next = (self.next + 1) % n.max(1);
        batch.finished.extend(finished);
        match self.ended.iter().all(|e| *e) {
            true => Ok(Poll::Finished),
            false => Ok(Poll::Open),
        }
    }

    fn known_fields(&self) -> Option<Vec<String>> {
        let mut all: Vec<String> = Vec::new();
        for p in &self.parts {
            for f in p.source.known_fields()? {
                if !all.contains(&f) {
                    all.push(f);
                }
            }
        }
        Some(all)
    }

    fn topic_binder(&self) -> Option<TopicBinder> {
        let mut out: Option<TopicBinder> = None;
        for b in self.parts.iter().filter_map(|p| p.source.topic_binder()) {
            match &mut out {
                None => out = Some(b),
                Some(o) => {
                    o.patterns.extend(b.patterns);
                    if o.topic_field.is_none() {
                        o.topic_field = b.topic_field;
                    }
                }
            }
        }
        out
    }

    fn position(&self) -> Option<Vec<u8>> {
        let all: Positions = self.parts.iter().map(|p| p.source.position()).collect();
        if all.iter().all(Option::is_none) {
            return None;
        }
        postcard::to_allocvec(&all).ok()
    }

    fn checkpoint_hook(&mut self) -> Option<CheckpointHook> {
        let hooks: Vec<Option<CheckpointHook>> = self
            .parts
            .iter_mut()
            .map(|p| p.source.checkpoint_hook())
            .collect();
        if hooks.iter().all(Option::is_none) {
            return None;
        }
        Some(Box::new(move |position: &[u8]| {
            let Ok(all) = postcard::from_bytes::<Positions>(position) else {
                return;
            };
            for (hook, pos) in hooks.iter().zip(all) {
                if let (Some(h), Some(p)) = (hook, pos) {
                    h(&p);
                }
            }
        }))
    }

    fn stop_input(&mut self) {
        for p in &mut self.parts {
            p.source.stop_input();
        }
    }

    fn seek(&mut self, position: &[u8]) -> Result<(), SourceError> {
        let all: Positions = postcard::from_bytes(position).map_err(|e| {
            SourceError::Other(format!(
                "{}: the saved position is not a union's ({e}); was the pipeline's source changed?",
                self.describe()
            ))
        })?;
        if all.len() != self.parts.len() {
            return Err(SourceError::Other(format!(
                "{}: the saved position has {} sources, this union {}",
                self.describe(),
                all.len(),
                self.parts.len()
            )));
        }
        for (p, pos) in self.parts.iter_mut().zip(all) {
            if let Some(pos) = pos {
                p.source.seek(&pos)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::memory::MemorySource;

    fn union() -> UnionSource {
        let part = |name: &str, lines: &[&str]| Part {
            name: name.into(),
            source: Box::new(MemorySource::from_lines(lines)),
            max_payload: 1 << 20,
        };
        UnionSource::new(vec![part("a", &["a1", "a2", "a3"]), part("b", &["b1"])])
    }

    #[test]
    fn every_item_is_marked_with_its_part_and_the_union_ends_with_the_last() {
        let mut u = union();
        let mut seen = Vec::new();
        let mut finished = Vec::new();
        for _ in 0..10 {
            let mut batch = RawBatch::default();
            let polled = u
                .poll(&mut batch, 2, 1 << 20, Duration::from_millis(1))
                .expect("memory sources do not fail");
            for it in &batch.items {
                seen.push((
                    it.source,
                    String::from_utf8_lossy(batch.payload(it)).into_owned(),
                ));
            }
            finished.extend(batch.finished.iter().copied());
            if polled == Poll::Finished {
                break;
            }
        }
        seen.sort();
        let want: Vec<(u16, String)> = [(0, "a1"), (0, "a2"), (0, "a3"), (1, "b1")]
            .iter()
            .map(|(s, p)| (*s, p.to_string()))
            .collect();
        assert_eq!(seen, want);
        finished.sort();
        assert_eq!(finished, [0, 1]);
    }

    #[test]
    fn a_restart_seeks_every_part() {
        let mut u = union();
        let mut batch = RawBatch::default();
        u.poll(&mut batch, 100, 1 << 20, Duration::ZERO)
            .expect("memory sources do not fail");
        let read = batch.items.len();
        assert!(read >= 2, "read {read}");
        let pos = u.position().expect("memory sources have positions");
        let mut again = union();
        again.seek(&pos).expect("seeks");
        let mut rest = RawBatch::default();
        for _ in 0..10 {
            again
                .poll(&mut rest, 100, 1 << 20, Duration::ZERO)
                .expect("memory sources do not fail");
        }
        assert_eq!(read + rest.items.len(), 4, "nothing twice, nothing lost");
        assert!(again.seek(b"\x05junk").is_err());
    }
}
