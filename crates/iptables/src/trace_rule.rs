//! One saved rule read for the packet tracer: its matches and its target, typed.
//!
//! Only the matches and targets kube-proxy-style rule sets use are understood. Anything else is an error
//! rather than "matches" or "does not match", because guessing would let the tracer report a path the kernel
//! does not take. The argument order does not matter, so rules read the same whether they come from our
//! payload text (`-m tcp -p tcp -d … --dport …`) or from `iptables-save`, which reorders and respells them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Why a rule could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("match module {0:?} is not understood")]
    UnsupportedModule(String),
    #[error("option {0:?} is not understood")]
    UnsupportedOption(String),
    #[error("target {0:?} is not understood")]
    UnsupportedTarget(String),
    #[error("option {option} has no value")]
    MissingValue { option: String },
    #[error("option {option} has a value it cannot take: {value:?}")]
    BadValue { option: String, value: String },
    #[error("\"!\" does not precede a negatable option")]
    MisplacedNegation,
}

/// A CIDR or single address (`-s`, `-d`).
pub type Net = IpNet;

/// The packet's protocol as a rule names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolSpec {
    /// `-p all` / `-p 0`.
    Any,
    /// A protocol by lower-case name; numbers are translated (`6` → `tcp`).
    Named(String),
}

/// Which address `-m addrtype` looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrSide {
    Source,
    Destination,
}

/// What `-m recent` does with its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecentMode {
    /// `--set`: records the address and always matches.
    Set,
    /// `--rcheck` / `--update`: matches when the address is on the list.
    Check,
    /// `--remove`: matches (and removes) when the address is on the list.
    Remove,
}

/// Conntrack states as `--ctstate` names them, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtStates(u8);

impl CtStates {
    pub const NEW: CtStates = CtStates(1);
    pub const ESTABLISHED: CtStates = CtStates(1 << 1);
    pub const RELATED: CtStates = CtStates(1 << 2);
    pub const INVALID: CtStates = CtStates(1 << 3);
    pub const UNTRACKED: CtStates = CtStates(1 << 4);
    pub const SNAT: CtStates = CtStates(1 << 5);
    pub const DNAT: CtStates = CtStates(1 << 6);

    pub fn union(self, other: CtStates) -> CtStates {
        CtStates(self.0 | other.0)
    }

    pub fn intersects(self, other: CtStates) -> bool {
        self.0 & other.0 != 0
    }

    fn parse(list: &str) -> Option<CtStates> {
        list.split(',').try_fold(CtStates::default(), |acc, name| {
            let bit = match name {
                "NEW" => CtStates::NEW,
                "ESTABLISHED" => CtStates::ESTABLISHED,
                "RELATED" => CtStates::RELATED,
                "INVALID" => CtStates::INVALID,
                "UNTRACKED" => CtStates::UNTRACKED,
                "SNAT" => CtStates::SNAT,
                "DNAT" => CtStates::DNAT,
                _ => return None,
            };
            Some(acc.union(bit))
        })
    }
}

/// One condition of a rule; `negated` is a preceding `!`.
#[derive(Debug, Clone, PartialEq)]
pub enum Match {
    Source {
        net: Net,
        negated: bool,
    },
    Destination {
        net: Net,
        negated: bool,
    },
    Protocol {
        protocol: ProtocolSpec,
        negated: bool,
    },
    /// `-i`; a trailing `+` makes the name a prefix.
    InInterface {
        name: String,
        negated: bool,
    },
    /// `-o`; a trailing `+` makes the name a prefix.
    OutInterface {
        name: String,
        negated: bool,
    },
    /// `--dport first[:last]` of the tcp, udp or sctp match.
    DestinationPort {
        first: u16,
        last: u16,
        negated: bool,
    },
    /// A tcp, udp or sctp match module without options still requires that protocol.
    ProtocolModule {
        protocol: String,
    },
    /// `-m addrtype --src-type/--dst-type LOCAL`, the only address type kube-proxy matches on.
    AddrTypeLocal {
        side: AddrSide,
        negated: bool,
    },
    /// `-m mark --mark value[/mask]`: `(mark & mask) == value`.
    Mark {
        value: u32,
        mask: u32,
        negated: bool,
    },
    /// `-m conntrack --ctstate LIST`: true when the connection is in any listed state.
    CtState {
        states: CtStates,
        negated: bool,
    },
    /// `-m statistic --mode random --probability p`.
    Random {
        probability: f64,
        negated: bool,
    },
    /// `-m recent`; the list name and timing options do not change what a first packet sees.
    Recent {
        mode: RecentMode,
        negated: bool,
    },
}

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// No `-j`: the rule only counts.
    None,
    /// `-j CHAIN`: call a user chain; come back when it returns.
    Jump(String),
    /// `-g CHAIN`: continue in a user chain; its return goes to our caller.
    Goto(String),
    Return,
    Accept,
    Drop,
    Reject,
    /// `-j DNAT --to-destination ip[:port]`.
    Dnat {
        address: IpAddr,
        port: Option<u16>,
    },
    /// `-j MARK`, every spelling reduced to the kernel's `mark = (mark & !mask) ^ value`.
    Mark {
        value: u32,
        mask: u32,
    },
    Masquerade,
    /// `LOG` / `NFLOG`: side effects only; the packet goes on to the next rule.
    Log,
}

/// A rule as the tracer evaluates it.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRule {
    pub matches: Vec<Match>,
    pub target: Target,
}

/// Match modules whose options we read; `comment` and `nfacct` are read and ignored.
const MODULES: [&str; 10] = [
    "comment",
    "tcp",
    "udp",
    "sctp",
    "addrtype",
    "mark",
    "conntrack",
    "statistic",
    "recent",
    "nfacct",
];

/// Targets the kernel provides; every other target name is a user chain.
const BUILTIN_TARGETS: [&str; 12] = [
    "ACCEPT",
    "DROP",
    "RETURN",
    "REJECT",
    "DNAT",
    "MARK",
    "MASQUERADE",
    "LOG",
    "NFLOG",
    "SNAT",
    "QUEUE",
    "CT",
];

/// Whether `name` after `-j` names a kernel target rather than a chain.
pub fn is_kernel_target(name: &str) -> bool {
    BUILTIN_TARGETS.contains(&name)
}

/// Reads the arguments after `-A CHAIN` (as [`crate::SavedRule::args`] holds them).
pub fn parse_rule(args: &[String]) -> Result<TraceRule, RuleError> {
    let mut p = Parser {
        args,
        pos: 0,
        modules: Vec::new(),
        matches: Vec::new(),
    };
    let target = p.run()?;
    Ok(TraceRule {
        matches: p.matches,
        target,
    })
}

struct Parser<'a> {
    args: &'a [String],
    pos: usize,
    /// Modules loaded so far, by `-m` or implicitly by `-p`; options belong to a loaded module.
    modules: Vec<String>,
    matches: Vec<Match>,
}

impl Parser<'_> {
    fn next(&mut self) -> Option<&str> {
        let arg = self.args.get(self.pos)?;
        self.pos += 1;
        Some(arg)
    }

    fn value(&mut self, option: &str) -> Result<String, RuleError> {
        self.next()
            .map(str::to_string)
            .ok_or_else(|| RuleError::MissingValue {
                option: option.to_string(),
            })
    }

    fn loaded(&self, module: &str) -> bool {
        self.modules.iter().any(|m| m == module)
    }

    fn run(&mut self) -> Result<Target, RuleError> {
        let mut negated = false;
        while let Some(arg) = self.next() {
            let arg = arg.to_string();
            if arg == "!" {
                if negated {
                    return Err(RuleError::MisplacedNegation);
                }
                negated = true;
                continue;
            }
            match arg.as_str() {
                "-j" | "--jump" | "-g" | "--goto" => {
                    if negated {
                        return Err(RuleError::MisplacedNegation);
                    }
                    let name = self.value(&arg)?;
                    return self.target(&arg, &name);
                }
                "-m" | "--match" => {
                    if negated {
                        return Err(RuleError::MisplacedNegation);
                    }
                    let module = self.value(&arg)?;
                    if !MODULES.contains(&module.as_str()) {
                        return Err(RuleError::UnsupportedModule(module));
                    }
                    if matches!(module.as_str(), "tcp" | "udp" | "sctp") {
                        self.matches.push(Match::ProtocolModule {
                            protocol: module.clone(),
                        });
                    }
                    self.modules.push(module);
                }
                _ => {
                    let m = self.option(&arg, negated)?;
                    self.matches.extend(m);
                }
            }
            negated = false;
        }
        if negated {
            return Err(RuleError::MisplacedNegation);
        }
        Ok(Target::None)
    }

    /// One match option and its value; `None` for options that do not constrain the packet.
    fn option(&mut self, option: &str, negated: bool) -> Result<Option<Match>, RuleError> {
        let bad = |value: &str| RuleError::BadValue {
            option: option.to_string(),
            value: value.to_string(),
        };
        let m = match option {
            "-s" | "--source" | "-d" | "--destination" => {
                let value = self.value(option)?;
                let net = parse_net(&value).ok_or_else(|| bad(&value))?;
                if matches!(option, "-s" | "--source") {
                    Match::Source { net, negated }
                } else {
                    Match::Destination { net, negated }
                }
            }
            "-p" | "--protocol" => {
                let value = self.value(option)?;
                let protocol = parse_protocol(&value);
                if let ProtocolSpec::Named(name) = &protocol {
                    // `-p tcp` makes the tcp match's options available without `-m tcp`.
                    self.modules.push(name.clone());
                }
                Match::Protocol { protocol, negated }
            }
            "-i" | "--in-interface" | "-o" | "--out-interface" => {
                let name = self.value(option)?;
                if matches!(option, "-i" | "--in-interface") {
                    Match::InInterface { name, negated }
                } else {
                    Match::OutInterface { name, negated }
                }
            }
            "--dport" | "--destination-port"
                if self.loaded("tcp") || self.loaded("udp") || self.loaded("sctp") =>
            {
                let value = self.value(option)?;
                let (first, last) = parse_port_range(&value).ok_or_else(|| bad(&value))?;
                Match::DestinationPort { first, last, negated }
            }
            "--comment" if self.loaded("comment") => {
                self.value(option)?;
                return Ok(None);
            }
            "--nfacct-name" if self.loaded("nfacct") => {
                self.value(option)?;
                return Ok(None);
            }
            "--src-type" | "--dst-type" if self.loaded("addrtype") => {
                let value = self.value(option)?;
                if value != "LOCAL" {
                    return Err(bad(&value));
                }
                let side = if option == "--src-type" {
                    AddrSide::Source
                } else {
                    AddrSide::Destination
                };
                Match::AddrTypeLocal { side, negated }
            }
            "--mark" if self.loaded("mark") => {
                let value = self.value(option)?;
                let (value, mask) = parse_mark(&value).ok_or_else(|| bad(&value))?;
                Match::Mark {
                    value,
                    mask: mask.unwrap_or(u32::MAX),
                    negated,
                }
            }
            "--ctstate" if self.loaded("conntrack") => {
                let value = self.value(option)?;
                let states = CtStates::parse(&value).ok_or_else(|| bad(&value))?;
                Match::CtState { states, negated }
            }
            "--mode" if self.loaded("statistic") => {
                let value = self.value(option)?;
                if value != "random" {
                    return Err(bad(&value));
                }
                return Ok(None);
            }
            "--probability" if self.loaded("statistic") => {
                let value = self.value(option)?;
                let probability: f64 = value.parse().map_err(|_| bad(&value))?;
                Match::Random { probability, negated }
            }
            "--set" | "--rcheck" | "--update" | "--remove" if self.loaded("recent") => {
                let mode = match option {
                    "--set" => RecentMode::Set,
                    "--remove" => RecentMode::Remove,
                    _ => RecentMode::Check,
                };
                Match::Recent { mode, negated }
            }
            // List bookkeeping and timing: what a connection's first packet sees does not depend on them.
            "--name" | "--seconds" | "--hitcount" | "--mask" if self.loaded("recent") => {
                self.value(option)?;
                return Ok(None);
            }
            "--reap" | "--rsource" | "--rdest" | "--rttl" if self.loaded("recent") => return Ok(None),
            _ => return Err(RuleError::UnsupportedOption(option.to_string())),
        };
        Ok(Some(m))
    }

    /// The target and its options, which follow `-j` to the end of the rule.
    fn target(&mut self, flag: &str, name: &str) -> Result<Target, RuleError> {
        let goto = matches!(flag, "-g" | "--goto");
        if goto || !is_kernel_target(name) {
            self.expect_end()?;
            return Ok(if goto {
                Target::Goto(name.to_string())
            } else {
                Target::Jump(name.to_string())
            });
        }
        let target = match name {
            "ACCEPT" => Target::Accept,
            "DROP" => Target::Drop,
            "RETURN" => Target::Return,
            "REJECT" => {
                while let Some(opt) = self.next().map(str::to_string) {
                    if opt != "--reject-with" {
                        return Err(RuleError::UnsupportedOption(opt));
                    }
                    self.value(&opt)?;
                }
                Target::Reject
            }
            "DNAT" => {
                let mut to = None;
                while let Some(opt) = self.next().map(str::to_string) {
                    match opt.as_str() {
                        "--to-destination" => {
                            let value = self.value(&opt)?;
                            let parsed = parse_nat_destination(&value).ok_or(RuleError::BadValue {
                                option: opt.clone(),
                                value,
                            })?;
                            to = Some(parsed);
                        }
                        "--random" | "--persistent" => {}
                        _ => return Err(RuleError::UnsupportedOption(opt)),
                    }
                }
                let (address, port) = to.ok_or(RuleError::MissingValue {
                    option: "--to-destination".into(),
                })?;
                Target::Dnat { address, port }
            }
            "MARK" => self.mark_target()?,
            "MASQUERADE" => {
                while let Some(opt) = self.next().map(str::to_string) {
                    match opt.as_str() {
                        "--random" | "--random-fully" => {}
                        "--to-ports" => {
                            self.value(&opt)?;
                        }
                        _ => return Err(RuleError::UnsupportedOption(opt)),
                    }
                }
                Target::Masquerade
            }
            "LOG" | "NFLOG" => {
                // Their options (prefix, level, group, …) only shape the log line.
                self.pos = self.args.len();
                Target::Log
            }
            other => return Err(RuleError::UnsupportedTarget(other.to_string())),
        };
        Ok(target)
    }

    fn mark_target(&mut self) -> Result<Target, RuleError> {
        let opt = self
            .next()
            .map(str::to_string)
            .ok_or_else(|| RuleError::MissingValue {
                option: "MARK".into(),
            })?;
        let value = self.value(&opt)?;
        let bad = || RuleError::BadValue {
            option: opt.clone(),
            value: value.clone(),
        };
        let (v, m) = parse_mark(&value).ok_or_else(bad)?;
        // The kernel stores every spelling as an xor-with-mask pair; iptables-save prints that pair back as
        // `--set-xmark`, so reducing here makes our payload and the saved rule mean the same thing.
        let (value_bits, mask) = match (opt.as_str(), m) {
            ("--set-xmark", m) => (v, m.unwrap_or(u32::MAX)),
            ("--set-mark", m) => (v, m.unwrap_or(u32::MAX) | v),
            ("--or-mark", None) => (v, v),
            ("--xor-mark", None) => (v, 0),
            ("--and-mark", None) => (0, !v),
            _ => return Err(bad()),
        };
        self.expect_end()?;
        Ok(Target::Mark {
            value: value_bits,
            mask,
        })
    }

    fn expect_end(&mut self) -> Result<(), RuleError> {
        match self.next() {
            None => Ok(()),
            Some(extra) => Err(RuleError::UnsupportedOption(extra.to_string())),
        }
    }
}

/// `10.0.0.0/8`, `10.1.2.3` (a single address) or the IPv6 forms; netmask notation is not used by
/// iptables-save for contiguous masks, which are the only ones kube-proxy writes.
fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net);
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

fn parse_protocol(s: &str) -> ProtocolSpec {
    let name = match s {
        "all" | "0" => return ProtocolSpec::Any,
        "6" => "tcp",
        "17" => "udp",
        "132" => "sctp",
        other => other,
    };
    ProtocolSpec::Named(name.to_ascii_lowercase())
}

fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    match s.split_once(':') {
        Some((a, b)) => {
            let first = if a.is_empty() { 0 } else { a.parse().ok()? };
            let last = if b.is_empty() { u16::MAX } else { b.parse().ok()? };
            (first <= last).then_some((first, last))
        }
        None => {
            let p = s.parse().ok()?;
            Some((p, p))
        }
    }
}

fn parse_u32(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `value[/mask]`, each hex (`0x…`) or decimal.
fn parse_mark(s: &str) -> Option<(u32, Option<u32>)> {
    match s.split_once('/') {
        Some((v, m)) => Some((parse_u32(v)?, Some(parse_u32(m)?))),
        None => Some((parse_u32(s)?, None)),
    }
}

/// `ip`, `ip:port`, `[ipv6]:port` or a bare IPv6 address. Ranges would make the destination a choice the
/// tracer does not model.
fn parse_nat_destination(s: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, port) = rest.split_once("]:")?;
        return Some((
            IpAddr::V6(addr.parse::<Ipv6Addr>().ok()?),
            Some(port.parse().ok()?),
        ));
    }
    if let Ok(v6) = s.parse::<Ipv6Addr>() {
        return Some((IpAddr::V6(v6), None));
    }
    match s.split_once(':') {
        Some((addr, port)) => Some((
            IpAddr::V4(addr.parse::<Ipv4Addr>().ok()?),
            Some(port.parse().ok()?),
        )),
        None => Some((IpAddr::V4(s.parse::<Ipv4Addr>().ok()?), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::save_parser::tokenize;

    fn parse(line: &str) -> Result<TraceRule, RuleError> {
        parse_rule(&tokenize(line).unwrap())
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn our_spelling_and_iptables_save_spelling_read_the_same() {
        let ours = parse(
            r#"-m comment --comment "ns/svc:p cluster IP" -m tcp -p tcp -d 10.96.0.1 --dport 443 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"#,
        )
        .unwrap();
        let saved = parse(
            r#"! -s 10.244.0.0/16 -d 10.96.0.1/32 -p tcp -m comment --comment "ns/svc:p cluster IP" -m tcp --dport 443 -j KUBE-MARK-MASQ"#,
        )
        .unwrap();
        let sorted = |r: &TraceRule| {
            let mut m: Vec<String> = r.matches.iter().map(|m| format!("{m:?}")).collect();
            m.sort();
            m
        };
        assert_eq!(sorted(&ours), sorted(&saved));
        assert_eq!(ours.target, Target::Jump("KUBE-MARK-MASQ".into()));
        assert!(saved.matches.contains(&Match::Source {
            net: net("10.244.0.0/16"),
            negated: true
        }));
        assert!(saved.matches.contains(&Match::DestinationPort {
            first: 443,
            last: 443,
            negated: false
        }));
    }

    #[test]
    fn mark_spellings_reduce_to_xor_with_mask() {
        let target = |line: &str| parse(line).unwrap().target;
        let or = Target::Mark {
            value: 0x4000,
            mask: 0x4000,
        };
        assert_eq!(target("-j MARK --or-mark 0x00004000"), or);
        assert_eq!(target("-j MARK --set-xmark 0x4000/0x4000"), or);
        let xor = Target::Mark {
            value: 0x4000,
            mask: 0,
        };
        assert_eq!(target("-j MARK --xor-mark 0x00004000"), xor);
        assert_eq!(target("-j MARK --set-xmark 0x4000/0x0"), xor);
        assert_eq!(
            target("-j MARK --and-mark 0xff"),
            Target::Mark {
                value: 0,
                mask: !0xff
            }
        );
        assert_eq!(
            target("-j MARK --set-mark 1/0xf0"),
            Target::Mark { value: 1, mask: 0xf1 }
        );
    }

    #[test]
    fn targets_with_options() {
        let target = |line: &str| parse(line).unwrap().target;
        assert_eq!(
            target("-p tcp -m tcp -j DNAT --to-destination 10.244.1.5:8080"),
            Target::Dnat {
                address: "10.244.1.5".parse().unwrap(),
                port: Some(8080)
            }
        );
        assert_eq!(
            target("-j DNAT --to-destination [fd00::5]:80"),
            Target::Dnat {
                address: "fd00::5".parse().unwrap(),
                port: Some(80)
            }
        );
        assert_eq!(target("-j MASQUERADE --random-fully"), Target::Masquerade);
        assert_eq!(
            target("-j REJECT --reject-with icmp-port-unreachable"),
            Target::Reject
        );
        assert_eq!(target("-g KUBE-X"), Target::Goto("KUBE-X".into()));
        assert_eq!(target("-m comment --comment x"), Target::None);
        assert_eq!(target(r#"-j LOG --log-prefix "x: ""#), Target::Log);
    }

    #[test]
    fn module_options_and_negations() {
        let rule = parse(
            "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -m mark ! --mark 0x4000/0x4000 \
             -m addrtype ! --dst-type LOCAL -m statistic --mode random --probability 0.25 \
             -m recent --rcheck --seconds 600 --reap --name KUBE-SEP-X --mask 255.255.255.255 --rsource \
             -m nfacct --nfacct-name  counter -i cbr0 ! -o eth+ -p udp --dport 30000:30100",
        )
        .unwrap();
        let want = [
            Match::CtState {
                states: CtStates::RELATED
                    .union(CtStates::ESTABLISHED)
                    .union(CtStates::DNAT),
                negated: true,
            },
            Match::Mark {
                value: 0x4000,
                mask: 0x4000,
                negated: true,
            },
            Match::AddrTypeLocal {
                side: AddrSide::Destination,
                negated: true,
            },
            Match::Random {
                probability: 0.25,
                negated: false,
            },
            Match::Recent {
                mode: RecentMode::Check,
                negated: false,
            },
            Match::InInterface {
                name: "cbr0".into(),
                negated: false,
            },
            Match::OutInterface {
                name: "eth+".into(),
                negated: true,
            },
            Match::Protocol {
                protocol: ProtocolSpec::Named("udp".into()),
                negated: false,
            },
            Match::DestinationPort {
                first: 30000,
                last: 30100,
                negated: false,
            },
        ];
        assert_eq!(rule.matches, want);
    }

    #[test]
    fn unknown_things_are_errors() {
        let err = |line: &str| parse(line).unwrap_err();
        assert_eq!(
            err("-m multiport --dports 80,443 -j ACCEPT"),
            RuleError::UnsupportedModule("multiport".into())
        );
        assert_eq!(
            err("-p tcp --sport 80 -j ACCEPT"),
            RuleError::UnsupportedOption("--sport".into())
        );
        // An option of a module that was not loaded.
        assert_eq!(
            err("--dport 80 -j ACCEPT"),
            RuleError::UnsupportedOption("--dport".into())
        );
        assert_eq!(
            err("-j SNAT --to-source 1.2.3.4"),
            RuleError::UnsupportedTarget("SNAT".into())
        );
        assert_eq!(
            err("-j DNAT --to-destination 10.0.0.1-10.0.0.9"),
            RuleError::BadValue {
                option: "--to-destination".into(),
                value: "10.0.0.1-10.0.0.9".into()
            }
        );
        assert_eq!(
            err("-m addrtype --dst-type BROADCAST"),
            RuleError::BadValue {
                option: "--dst-type".into(),
                value: "BROADCAST".into()
            }
        );
        assert_eq!(
            err("-m statistic --mode nth --every 2"),
            RuleError::BadValue {
                option: "--mode".into(),
                value: "nth".into()
            }
        );
        assert_eq!(
            err("-m conntrack --ctstate NEWISH"),
            RuleError::BadValue {
                option: "--ctstate".into(),
                value: "NEWISH".into()
            }
        );
        assert_eq!(err("! -m mark --mark 1"), RuleError::MisplacedNegation);
        assert_eq!(err("-s 10.0.0.0/8 !"), RuleError::MisplacedNegation);
        assert_eq!(
            err("-j KUBE-X --extra"),
            RuleError::UnsupportedOption("--extra".into())
        );
        assert_eq!(
            err("-j DNAT"),
            RuleError::MissingValue {
                option: "--to-destination".into()
            }
        );
    }

    #[test]
    fn addresses_protocols_and_ports() {
        assert_eq!(parse_net("10.1.2.3"), Some(net("10.1.2.3/32")));
        assert_eq!(parse_net("fd00::/64"), Some(net("fd00::/64")));
        assert_eq!(parse_net("example.com"), None);
        assert_eq!(parse_protocol("6"), ProtocolSpec::Named("tcp".into()));
        assert_eq!(parse_protocol("all"), ProtocolSpec::Any);
        assert_eq!(parse_port_range("80"), Some((80, 80)));
        assert_eq!(parse_port_range(":80"), Some((0, 80)));
        assert_eq!(parse_port_range("90:80"), None);
        assert_eq!(parse_mark("16384"), Some((16384, None)));
        assert_eq!(
            parse_nat_destination("10.0.0.1"),
            Some(("10.0.0.1".parse().unwrap(), None))
        );
    }
}
