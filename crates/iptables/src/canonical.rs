//! A spelling-independent form of one rule, so rules we wrote can be compared with what `iptables-save`
//! prints back: it respells addresses (`/32`), marks (`--or-mark` becomes `--set-xmark`), hex (padding),
//! probabilities (11 decimals, from the kernel's fixed-point value) and adds the defaults of `recent` and
//! `REJECT`.

/// The rule's arguments after `-A CHAIN`, as a sorted multiset with those respellings undone. An nfacct match
/// counts: a rule without the one we write counts nothing, and must be rewritten.
pub fn canonical_rule(args: &[String]) -> Vec<String> {
    fn hex(s: &str) -> String {
        s.split('/')
            .map(
                |p| match p.strip_prefix("0x").and_then(|h| u64::from_str_radix(h, 16).ok()) {
                    Some(v) => format!("{v:#x}"),
                    None => p.to_string(),
                },
            )
            .collect::<Vec<_>>()
            .join("/")
    }
    let mut out = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let next = args.get(i + 1).map(String::as_str);
        match (a, next) {
            ("--mask", Some("255.255.255.255" | "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")) => i += 2,
            ("--rsource", _) => i += 1,
            ("--reject-with", Some("icmp-port-unreachable" | "icmp6-port-unreachable")) => i += 2,
            ("--or-mark", Some(m)) => {
                let m = hex(m);
                out.extend(["--set-xmark".to_string(), format!("{m}/{m}")]);
                i += 2;
            }
            ("--xor-mark", Some(m)) => {
                out.extend(["--set-xmark".to_string(), format!("{}/0x0", hex(m))]);
                i += 2;
            }
            ("--probability", Some(p)) => {
                // The kernel keeps 32-bit fixed point; eight decimals survive the round trip.
                let p = p
                    .parse::<f64>()
                    .map(|p| format!("{p:.8}"))
                    .unwrap_or_else(|_| p.to_string());
                out.extend([a.to_string(), p]);
                i += 2;
            }
            _ => {
                // ip6tables-save adds /128 to a lone address as iptables-save adds /32. Only addresses: a
                // port or a mark never ends so.
                let lone = a
                    .strip_suffix("/32")
                    .or_else(|| a.strip_suffix("/128").filter(|ip| ip.contains(':')))
                    .unwrap_or(a);
                out.push(hex(lone));
                i += 1;
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::save_parser::tokenize;

    fn c(line: &str) -> Vec<String> {
        canonical_rule(&tokenize(line).unwrap()[2..])
    }

    #[test]
    fn written_and_saved_spellings_agree() {
        assert_eq!(
            c("-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000"),
            c("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000")
        );
        assert_eq!(
            c("-A KUBE-SERVICES -m comment --comment \"a b\" -m tcp -p tcp -d 10.96.0.1 --dport 443 -j X"),
            c("-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"a b\" -m tcp --dport 443 -j X")
        );
        assert_eq!(
            c("-A S -m statistic --mode random --probability 0.3333333333 -j E"),
            c("-A S -m statistic --mode random --probability 0.33333333349 -j E")
        );
        assert_ne!(c("-A S -d 10.96.0.1 -j X"), c("-A S -d 10.96.0.2 -j X"));
    }

    #[test]
    fn ip6tables_spellings_agree_too() {
        assert_eq!(
            c("-A KUBE-SERVICES -m tcp -p tcp -d fd00:10:96::60 --dport 80 -j X"),
            c("-A KUBE-SERVICES -d fd00:10:96::60/128 -p tcp -m tcp --dport 80 -j X")
        );
        assert_eq!(
            c("-A S -m recent --name S --rcheck --seconds 10800 --reap -j E"),
            c(
                "-A S -m recent --rcheck --seconds 10800 --reap --name S --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource -j E"
            )
        );
        assert_eq!(
            c("-A F -m tcp -p tcp -d fd00::1 --dport 80 -j REJECT"),
            c("-A F -d fd00::1/128 -p tcp -m tcp --dport 80 -j REJECT --reject-with icmp6-port-unreachable")
        );
        assert_ne!(c("-A S -d fd00::/64 -j X"), c("-A S -d fd00:: -j X"));
    }
}
