//! Rendezvous (highest random weight) hashing: which node owns a key.
//!
//! Used by the balancer (client IP -> worker) and by workers (channel name -> broker). Every node
//! gets a score for the key; the highest score wins, and the rest, in falling order, are the
//! fallbacks. When a node leaves, only the keys it owned move; when one joins, only the keys it
//! now wins move to it.
//!
//! The score is stable across processes, machines and releases, so that every worker places a
//! channel on the same broker without talking to the others:
//!
//! ```text
//! score(node, key) = mix64(fnv1a64(node || 0xFF || key))
//! ```
//!
//! where `fnv1a64` is 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3) over
//! the UTF-8 bytes, `0xFF` is a separator byte that cannot occur in UTF-8, and `mix64` is the
//! SplitMix64 finalizer, which spreads FNV's weak low bits. Ties (practically impossible) go to
//! the smaller node id. The fixed vectors in the tests pin this down.

/// The score of `node` for `key`: higher wins.
pub fn score(node: &str, key: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for &byte in node.as_bytes().iter().chain(&[0xFF]).chain(key) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    mix64(hash)
}

/// The node that owns `key`, or `None` when there are no nodes.
pub fn owner<'a, N: AsRef<str> + ?Sized + 'a>(
    nodes: impl IntoIterator<Item = &'a N>,
    key: &[u8],
) -> Option<&'a N> {
    nodes
        .into_iter()
        .map(|node| (score(node.as_ref(), key), node))
        .max_by(|(sa, na), (sb, nb)| sa.cmp(sb).then_with(|| nb.as_ref().cmp(na.as_ref())))
        .map(|(_, node)| node)
}

/// Every node in rendezvous order for `key`: the owner first, then the fallbacks.
pub fn ranked<'a, N: AsRef<str> + ?Sized + 'a>(
    nodes: impl IntoIterator<Item = &'a N>,
    key: &[u8],
) -> Vec<&'a N> {
    let mut scored: Vec<(u64, &'a N)> =
        nodes.into_iter().map(|node| (score(node.as_ref(), key), node)).collect();
    scored.sort_by(|(sa, na), (sb, nb)| sb.cmp(sa).then_with(|| na.as_ref().cmp(nb.as_ref())));
    scored.into_iter().map(|(_, node)| node).collect()
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_vectors() {
        // These values are part of the cluster's contract: changing them moves every channel.
        // Computed independently (a Python rendering of the formula in the module docs).
        assert_eq!(score("broker-0", b"news"), 0x8fde_ae27_83cb_88d8);
        assert_eq!(score("broker-1", b"news"), 0x037f_ada7_72d1_8f63);
        assert_eq!(score("broker-2", b"news"), 0x3ca8_aa20_4891_90bb);
        assert_eq!(score("worker-1", b"127.0.0.1"), 0x1770_c5fc_f5cf_7ffc);
        assert_eq!(score("worker-2", b"127.0.0.1"), 0x4093_2b75_9426_c92c);
        assert_eq!(score("b", b""), 0x5326_50cf_6e3f_1c38);
        let brokers = ["broker-0", "broker-1", "broker-2"];
        assert_eq!(owner(brokers.iter().copied(), b"news"), Some("broker-0"));
        assert_eq!(ranked(brokers.iter().copied(), b"news"), ["broker-0", "broker-2", "broker-1"]);
    }

    #[test]
    fn owner_is_the_first_of_ranked() {
        let nodes = ["broker-0", "broker-1", "broker-2"];
        for key in ["news", "chat", "a", "user/123", "été"] {
            let ranked = ranked(nodes.iter().copied(), key.as_bytes());
            assert_eq!(ranked.len(), 3);
            assert_eq!(Some(ranked[0]), owner(nodes.iter().copied(), key.as_bytes()));
        }
    }

    #[test]
    fn no_nodes_no_owner() {
        let nodes: [&str; 0] = [];
        assert_eq!(owner(nodes.iter().copied(), b"news"), None);
    }

    #[test]
    fn removing_a_node_moves_only_its_keys() {
        let all = ["w-0", "w-1", "w-2", "w-3"];
        let fewer = ["w-0", "w-1", "w-3"];
        let mut moved = 0;
        for i in 0..2000 {
            let key = format!("channel-{i}");
            let before = owner(all.iter().copied(), key.as_bytes()).unwrap();
            let after = owner(fewer.iter().copied(), key.as_bytes()).unwrap();
            if before != "w-2" {
                assert_eq!(before, after, "{key} moved although its owner stayed");
            } else {
                moved += 1;
            }
        }
        // Roughly a quarter of the keys lived on the node that left.
        assert!((350..650).contains(&moved), "{moved}");
    }

    #[test]
    fn spread_is_even() {
        let nodes = ["b-0", "b-1", "b-2"];
        let mut counts = [0usize; 3];
        for i in 0..3000 {
            let key = format!("k{i}");
            let owner = owner(nodes.iter().copied(), key.as_bytes()).unwrap();
            counts[nodes.iter().position(|n| *n == owner).unwrap()] += 1;
        }
        for count in counts {
            assert!((850..1150).contains(&count), "{counts:?}");
        }
    }
}
