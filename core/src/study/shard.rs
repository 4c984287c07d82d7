//! One part of a study's cases, so a sweep can run as N independent jobs (an array job on a
//! cluster): the case at position p of the dataset's list belongs to part p mod N. Round robin
//! spreads the cases evenly whatever their order, and every part is fixed by the list alone.

use serde::{Deserialize, Serialize};

use crate::error::{LociError, Result};

/// Part `index` (1-based) of `count`, written `I/N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// Which part, from 1 to `count`.
    pub index: usize,
    /// How many parts.
    pub count: usize,
}

impl Shard {
    /// The whole list as one part.
    pub const WHOLE: Shard = Shard { index: 1, count: 1 };

    /// Whether the case at `position` (0-based, in the dataset's order) is in this part.
    pub fn holds(&self, position: usize) -> bool {
        position % self.count == self.index - 1
    }

    /// The items of `list` in this part, in order.
    pub fn of<'a, T>(&self, list: &'a [T]) -> Vec<&'a T> {
        list.iter()
            .enumerate()
            .filter(|(p, _)| self.holds(*p))
            .map(|(_, t)| t)
            .collect()
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = LociError;
    /// `I/N` with 1 ≤ I ≤ N.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| LociError::input(format!("shard {s:?}: {why}"));
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| bad("write it I/N, e.g. 2/8"))?;
        let parse = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| bad("I and N are numbers"))
        };
        let (index, count) = (parse(i)?, parse(n)?);
        if count == 0 {
            return Err(bad("N must be at least 1"));
        }
        if index == 0 || index > count {
            return Err(bad(&format!("I must be between 1 and {count}")));
        }
        Ok(Shard { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_cases_and_bad_specs_are_refused() {
        let cases: Vec<usize> = (0..10).collect();
        let parts: Vec<Vec<usize>> = (1..=3)
            .map(|i| {
                let s: Shard = format!("{i}/3").parse().unwrap();
                s.of(&cases).into_iter().copied().collect()
            })
            .collect();
        assert_eq!(parts, [vec![0, 3, 6, 9], vec![1, 4, 7], vec![2, 5, 8]]);
        assert_eq!(Shard::WHOLE.of(&cases).len(), 10);
        assert_eq!("2/8".parse::<Shard>().unwrap().to_string(), "2/8");
        for (spec, why) in [
            ("0/3", "between 1 and 3"),
            ("4/3", "between 1 and 3"),
            ("1/0", "at least 1"),
            ("1-3", "I/N"),
            ("a/3", "numbers"),
        ] {
            let e = spec.parse::<Shard>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(spec), "{spec}: {e}");
        }
    }
}
