//! A Monitor's schedule: five cron fields in UTC, or `@every` a duration.
//! Pure: the caller passes the time.

use std::time::Duration;

use k8s_openapi::jiff::tz::TimeZone;
use k8s_openapi::jiff::{SignedDuration, Timestamp, ToSpan};

/// The shortest `@every`: runs more often would only pile load on a pool.
pub const MIN_EVERY: Duration = Duration::from_secs(10);
/// The longest `@every`.
pub const MAX_EVERY: Duration = Duration::from_secs(86_400);
/// How far ahead a cron schedule is searched (a `30 2 31 2 *` never comes).
const SEARCH_DAYS: i64 = 4 * 366;

#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    Every(Duration),
    Cron(Cron),
}

/// The allowed values of each field, as bit sets.
#[derive(Clone, Debug, PartialEq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Both day fields restricted: a day matches when either does (as cron has it).
    either_day: bool,
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(duration) = text.strip_prefix("@every ") {
            let every = every(duration.trim())?;
            if !(MIN_EVERY..=MAX_EVERY).contains(&every) {
                return Err(format!("@every {duration}: between 10s and 24h"));
            }
            return Ok(Self::Every(every));
        }
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(format!("{text:?}: five cron fields (minute hour day month weekday), or @every 5m"));
        };
        let cron = Cron {
            minutes: field(minute, 0, 59, "minute")?,
            hours: field(hour, 0, 23, "hour")? as u32,
            days: field(day, 1, 31, "day of month")? as u32,
            months: field(month, 1, 12, "month")? as u16,
            // 7 is Sunday too.
            weekdays: {
                let bits = field(weekday, 0, 7, "day of week")?;
                ((bits | (bits >> 7)) & 0x7f) as u8
            },
            either_day: day != "*" && weekday != "*",
        };
        Ok(Self::Cron(cron))
    }

    /// The first time after `after` the schedule is due, if any comes within four years.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        match self {
            Self::Every(every) => after.checked_add(SignedDuration::try_from(*every).ok()?).ok(),
            Self::Cron(cron) => cron.next_after(after),
        }
    }

    /// The latest time due in `(after, now]`, skipping the ones missed
    /// before it, so a monitor that was down for a while runs once, not
    /// once for every missed time.
    pub fn latest_due(&self, after: Timestamp, now: Timestamp) -> Option<Timestamp> {
        let mut due = self.next_after(after).filter(|t| *t <= now)?;
        if let Self::Every(every) = self {
            // Straight to the last multiple before now.
            let step = every.as_secs().max(1) as i64;
            let behind = now.as_second() - due.as_second();
            return due.checked_add((behind / step * step).seconds()).ok();
        }
        // A minute at a time at worst; bounded for a schedule of every minute missed for a week.
        for _ in 0..20_000 {
            match self.next_after(due) {
                Some(next) if next <= now => due = next,
                _ => break,
            }
        }
        Some(due)
    }
}

impl Cron {
    fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        // Whole minutes, from the minute after `after`.
        let start = Timestamp::from_second(after.as_second() - after.as_second().rem_euclid(60) + 60).ok()?;
        let mut at = start.to_zoned(TimeZone::UTC);
        let end = start.checked_add(SignedDuration::from_hours(24 * SEARCH_DAYS)).ok()?;
        while at.timestamp() < end {
            let (month, day, weekday) = (at.month() as u32, at.day() as u32, at.weekday().to_sunday_zero_offset());
            let day_ok = if self.either_day {
                bit32(self.days, day) || self.weekdays & (1 << weekday) != 0
            } else {
                bit32(self.days, day) && self.weekdays & (1 << weekday) != 0
            };
            if self.months & (1 << month) == 0 || !day_ok {
                // Next day, at midnight.
                at = at.start_of_day().ok()?.checked_add(1.day()).ok()?;
                continue;
            }
            if !bit32(self.hours, at.hour() as u32) {
                let hour_start = at.timestamp().as_second() - at.timestamp().as_second().rem_euclid(3600);
                at = Timestamp::from_second(hour_start + 3600).ok()?.to_zoned(TimeZone::UTC);
                continue;
            }
            if self.minutes & (1 << at.minute()) == 0 {
                at = at.checked_add(1.minute()).ok()?;
                continue;
            }
            return Some(at.timestamp());
        }
        None
    }
}

fn bit32(set: u32, value: u32) -> bool {
    set & (1 << value) != 0
}

/// `90s`, `5m`, `1h`.
fn every(text: &str) -> Result<Duration, String> {
    let invalid = || format!("@every {text}: a whole number of s, m or h, as 5m");
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let count: u64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit {
        "s" => count,
        "m" => count.saturating_mul(60),
        "h" => count.saturating_mul(3600),
        _ => return Err(invalid()),
    };
    Ok(Duration::from_secs(seconds))
}

/// One cron field as a bit set of the values `low..=high` it allows.
fn field(text: &str, low: u32, high: u32, name: &str) -> Result<u64, String> {
    let invalid = |why: &str| format!("{name} field {text:?}: {why}");
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step.parse().map_err(|_| invalid("a step is a number"))?;
                if step == 0 {
                    return Err(invalid("a step of 0"));
                }
                (range, step)
            }
            None => (part, 1),
        };
        let (from, to) = if range == "*" {
            (low, high)
        } else if let Some((from, to)) = range.split_once('-') {
            let from = from.parse().map_err(|_| invalid("a range is two numbers"))?;
            let to = to.parse().map_err(|_| invalid("a range is two numbers"))?;
            (from, to)
        } else {
            let value: u32 = range.parse().map_err(|_| invalid("not a number, range, step or *"))?;
            // `5/15` means from 5 to the end, every 15.
            (value, if step > 1 { high } else { value })
        };
        if from < low || to > high || from > to {
            return Err(invalid(&format!("values are {low} to {high}")));
        }
        bits |= (from..=to).step_by(step as usize).fold(0, |bits, value| bits | (1u64 << value));
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn next(schedule: &str, after: &str) -> String {
        Schedule::parse(schedule).unwrap().next_after(at(after)).unwrap().to_string()
    }

    #[test]
    fn every_adds_its_duration() {
        assert_eq!(next("@every 90s", "2026-12-05T10:00:00Z"), "2026-12-05T10:01:30Z");
        assert_eq!(next("@every 5m", "2026-12-05T10:00:07Z"), "2026-12-05T10:05:07Z");
        assert_eq!(next("@every 1h", "2026-12-05T10:00:00Z"), "2026-12-05T11:00:00Z");
        for bad in ["@every 5s", "@every 25h", "@every 5", "@every m", "@every -5m", "@every 5d"] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cron_fields_find_the_next_minute() {
        assert_eq!(next("* * * * *", "2026-12-05T10:00:30Z"), "2026-12-05T10:01:00Z");
        assert_eq!(next("*/5 * * * *", "2026-12-05T10:00:00Z"), "2026-12-05T10:05:00Z");
        assert_eq!(next("*/5 * * * *", "2026-12-05T10:03:00Z"), "2026-12-05T10:05:00Z");
        assert_eq!(next("30 2 * * *", "2026-12-05T10:00:00Z"), "2026-12-06T02:30:00Z");
        assert_eq!(next("0 9-17/4 * * *", "2026-12-05T10:00:00Z"), "2026-12-05T13:00:00Z");
        assert_eq!(next("0,30 * * * *", "2026-12-05T10:10:00Z"), "2026-12-05T10:30:00Z");
        assert_eq!(next("5/20 * * * *", "2026-12-05T10:06:00Z"), "2026-12-05T10:25:00Z");
        // 2026-12-05 is a Saturday; Sunday is 0 and 7.
        assert_eq!(next("0 0 * * 0", "2026-12-05T10:00:00Z"), "2026-12-06T00:00:00Z");
        assert_eq!(next("0 0 * * 7", "2026-12-05T10:00:00Z"), "2026-12-06T00:00:00Z");
        assert_eq!(next("0 0 1 1 *", "2026-12-05T10:00:00Z"), "2027-01-01T00:00:00Z");
        // Both day fields: either matches (the 10th, or a Monday: the 7th comes first).
        assert_eq!(next("0 0 10 * 1", "2026-12-05T10:00:00Z"), "2026-12-07T00:00:00Z");
        // A leap day, years ahead.
        assert_eq!(next("0 0 29 2 *", "2026-12-05T10:00:00Z"), "2028-02-29T00:00:00Z");
        // A day that never comes.
        assert_eq!(Schedule::parse("0 0 31 2 *").unwrap().next_after(at("2026-12-05T10:00:00Z")), None);
    }

    #[test]
    fn bad_cron_fields_say_which() {
        for (bad, word) in [
            ("* * * *", "five cron fields"),
            ("60 * * * *", "minute"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day of month"),
            ("* * * 13 *", "month"),
            ("* * * * 8", "day of week"),
            ("*/0 * * * *", "step of 0"),
            ("5-1 * * * *", "minute"),
            ("a * * * *", "not a number"),
        ] {
            let error = Schedule::parse(bad).unwrap_err();
            assert!(error.contains(word), "{bad}: {error}");
        }
    }

    #[test]
    fn missed_times_run_once() {
        let every = Schedule::parse("@every 1m").unwrap();
        let due = every.latest_due(at("2026-12-05T10:00:00Z"), at("2026-12-05T10:10:30Z"));
        assert_eq!(due, Some(at("2026-12-05T10:10:00Z")));
        assert_eq!(every.latest_due(at("2026-12-05T10:00:00Z"), at("2026-12-05T10:00:59Z")), None);
        let cron = Schedule::parse("*/5 * * * *").unwrap();
        let due = cron.latest_due(at("2026-12-05T10:00:00Z"), at("2026-12-05T11:07:00Z"));
        assert_eq!(due, Some(at("2026-12-05T11:05:00Z")));
    }
}
